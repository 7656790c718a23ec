"""Profiles (profiles.py): the file's rules as tables, the settings they make (config.py), a backend's
refusal of what it cannot honour, and, on a real Redis and the fake backend, capacity counted in
memory across profiles, a pool per profile, and culling by each instance's profile."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace

import pytest
from test_pool import filling
from test_pool import until

from backends.local_process import ProcessBackend
from backends.local_process import ProcessOptions
from config import Settings
from config import parse_settings
from culler import Activity
from culler import Culler
from fake_backend import UNIT_SETTINGS
from fake_backend import FakeBackend
from instances import NoCapacity
from instances import Order
from lifetime import Lifetime
from lifetime import lifetime_of
from pool import PoolFiller

BIG = {"mem_limit": "4g", "cpus": 2, "pids_limit": 512, "env": {"COURSE": "ml"}}


def settings(text: str, tmp_path, suffix: str = ".toml", **changes) -> Settings:
    """Settings as the proxy parses them, with this profiles file."""
    path = tmp_path / f"profiles{suffix}"
    path.write_text(text)
    values = {**Settings(sign_key="k").__dict__, "backend_options": {"image": "datalab-notebook:latest"}}
    return parse_settings({**values, "profiles": str(path), **changes})


# The file's rules


@pytest.mark.parametrize(
    "tables, said",
    [
        ([], "must be a table of profiles"),
        ({"Big": {}}, "profile 'Big': the name is not valid"),
        ({"big": 3}, "profile 'big': must be a table of fields"),
        ({"big": {"memory": "4g"}}, "profile 'big', field memory: is not a profile's field"),
        ({"big": {"mem_limit": "4 GB"}}, "profile 'big', field mem_limit: must look like 512m or 1g"),
        ({"big": {"mem_limit": 4}}, "profile 'big', field mem_limit: has the wrong type"),
        ({"big": {"cpus": 0}}, "profile 'big', field cpus: must be a positive number of CPUs"),
        ({"big": {"cpus": True}}, "profile 'big', field cpus: has the wrong type"),
        ({"big": {"pids_limit": "64"}}, "profile 'big', field pids_limit: has the wrong type"),
        ({"big": {"pids_limit": 0}}, "profile 'big', field pids_limit: must be positive"),
        ({"big": {"disk_limit": "lots"}}, "profile 'big', field disk_limit: must look like 256m, 1g or auto"),
        ({"big": {"idle_timeout": 0}}, "profile 'big', field idle_timeout: must be positive"),
        ({"big": {"max_age": True}}, "profile 'big', field max_age: has the wrong type"),
        ({"big": {"pool_size": -1}}, "profile 'big', field pool_size: must be zero or positive"),
        # Numbers no engine, Redis TTL or JSON reader takes (review of issue 20): refused at start-up,
        # not at the profile's every start.
        ({"big": {"pids_limit": 10**30}}, "profile 'big', field pids_limit: is larger than 2147483647"),
        ({"big": {"idle_timeout": 2**63}}, "profile 'big', field idle_timeout: is larger than 2147483647"),
        ({"big": {"max_age": 10**30}}, "profile 'big', field max_age: is larger than 2147483647"),
        ({"big": {"pool_size": 10**9 * 10**9}}, "profile 'big', field pool_size: is larger than 2147483647"),
        ({"big": {"cpus": "inf"}}, "profile 'big', field cpus: must be a positive number of CPUs"),
        ({"big": {"cpus": "1e308"}}, "profile 'big', field cpus: must be a positive number of CPUs"),
        ({"big": {"cpus": "nan"}}, "profile 'big', field cpus: must be a positive number of CPUs"),
        ({"big": {"image": ""}}, "profile 'big', field image: must name a local image"),
        ({"big": {"image": "a b"}}, "profile 'big', field image: must name a local image"),
        ({"big": {"env": ["A=1"]}}, "profile 'big', field env: must be a table"),
        ({"big": {"env": {"1A": "x"}}}, "field env: '1A' is not a variable name"),
        ({"big": {"env": {"A-B": "x"}}}, "field env: 'A-B' is not a variable name"),
        ({"big": {"env": {"A\n": "x"}}}, "field env: 'A\\n' is not a variable name"),
        ({"big": {"image": "img\n"}}, "profile 'big', field image: must name a local image"),
        ({"big": {"env": {"A": "x\ny"}}}, "field env: A must be a string of at most 4096 printable characters"),
        ({"big": {"env": {"A": 1}}}, "field env: A must be a string"),
        ({"big": {"env": {"A": "x" * 4097}}}, "field env: A must be a string"),
        ({"big": {"env": {"DATALAB_AUTH": "mine"}}}, "field env: DATALAB_AUTH is set by the proxy itself"),
        ({"big": {"env": {"JUPYTER_CONFIG_DIR": "/x"}}}, "field env: JUPYTER_CONFIG_DIR is set by the proxy"),
        ({"big": {"env": {"HOME": "/x"}}}, "field env: HOME is set by the proxy itself"),
        ({"big": {"env": {"PATH": "/x"}}}, "field env: PATH is set by the proxy itself"),
        ({"big": {"env": {f"V{i}": "" for i in range(65)}}}, "field env: has 65 variables; at most 64"),
        ({f"p{i}": {} for i in range(65)}, "declares 65 profiles; at most 64"),
    ],
)
def test_a_bad_table_is_refused_naming_its_profile_and_field(tables, said, tmp_path):
    with pytest.raises(ValueError) as refused:
        settings(json.dumps(tables), tmp_path, ".json")
    assert said in str(refused.value) and "datalab_profiles: " in str(refused.value)


@pytest.mark.parametrize(
    "text, said",
    [
        ("[big\nmem_limit = 1", "is not valid TOML"),
        ('[big]\nmem_limit = "4g"\nmem_limit = "2g"\n', "is not valid TOML"),
        (b"\xff\xfe".decode("latin-1"), "is not valid TOML"),
    ],
)
def test_a_file_that_is_no_toml_is_refused(text, said, tmp_path):
    with pytest.raises(ValueError, match=said):
        settings(text, tmp_path)


def test_a_missing_file_is_refused_and_a_relative_path_too(tmp_path):
    with pytest.raises(ValueError, match="cannot be read"):
        parse_settings({**Settings(sign_key="k").__dict__, "profiles": str(tmp_path / "none.toml")})
    with pytest.raises(ValueError, match="datalab_profiles must be empty or an absolute path"):
        parse_settings({**Settings(sign_key="k").__dict__, "profiles": "profiles.toml"})


def test_without_a_file_default_is_the_options():
    s = parse_settings({**Settings(sign_key="k", mem_limit="2g", pool_size=3).__dict__})
    assert list(s.profile_table) == ["default"]
    default = s.profile("default")
    assert (default.limits.mem_limit, default.pool_size, default.idle_timeout) == ("2g", 3, 1800)
    assert default.limits == s.limits and default.limits.image == "" and default.limits.env == {}


def test_a_profile_takes_the_defaults_it_leaves_out_but_keeps_no_pool_unless_it_says(tmp_path):
    s = settings(
        '[default]\nmax_age = 600\nenv = { TEAM = "a" }\n'
        '[big]\nmem_limit = "4g"\ncpus = 2\npids_limit = 512\n[big.env]\nCOURSE = "ml"\n'
        '[same]\nimage = "datalab-notebook:latest"\npool_size = 1\n',
        tmp_path,
        idle_timeout=900,
    )
    assert list(s.profile_table) == ["default", "big", "same"]
    big, same, default = s.profile("big"), s.profile("same"), s.profile("default")
    assert (big.limits.mem_limit, big.limits.cpus, big.limits.pids_limit) == ("4g", 2.0, 512)
    assert big.limits.env == {"COURSE": "ml"} and default.limits.env == {"TEAM": "a"}
    assert (big.idle_timeout, big.max_age, big.pool_size) == (900, 600, 0)  # the default's, but no pool
    assert s.max_age == 600 and default.pool_size == s.pool_size == 2  # the file's default table is the options'
    assert same.limits.image == "" and same.pool_size == 1  # datalab_image is the default image
    assert big.limits.label_prefix == s.key_prefix and big.limits.start_timeout == s.start_timeout


def test_the_file_may_redefine_the_default(tmp_path):
    s = settings('[default]\nmem_limit = "2g"\npool_size = 0\nimage = "other:1"\n', tmp_path)
    assert (s.mem_limit, s.pool_size) == ("2g", 0)
    assert s.limits.mem_limit == "2g" and s.limits.image == "other:1"


def test_json_says_the_same(tmp_path):
    s = settings(json.dumps({"big": BIG}), tmp_path, ".json")
    assert s.profile("big").limits.mem_limit == "4g" and s.profile("big").limits.env == {"COURSE": "ml"}


def test_an_undeclared_name_is_the_defaults():
    """An instance's record from before the file changed: it is culled by the default's times."""
    s = Settings(sign_key="k")
    assert s.profile("gone") == s.profile("default")


def test_a_container_profile_whose_disk_does_not_fit_its_memory_is_refused(tmp_path):
    text = '[small]\nmem_limit = "512m"\ndisk_limit = "1g"\n'
    with pytest.raises(ValueError, match="datalab_profiles: profile 'small': datalab_disk_limit=1g does not fit"):
        settings(text, tmp_path, backend="docker")
    assert settings(text, tmp_path, backend="process").profile("small").limits.disk_limit == "1g"


def test_the_process_backend_refuses_a_profile_with_an_image(tmp_path):
    s = settings('[gpu]\nimage = "datalab-gpu:latest"\n[big]\nmem_limit = "4g"\n', tmp_path, backend="process")
    with pytest.raises(ValueError) as refused:
        ProcessBackend(s.limits, ProcessOptions(), {n: p.limits for n, p in s.profile_table.items()})
    assert "profile 'gpu' cannot run on the process backend" in str(refused.value)
    assert "runs no images" in str(refused.value)
    ProcessBackend(s.limits, ProcessOptions(), {"big": s.profile("big").limits})  # memory it can limit


# Capacity, pools and culling per profile (a real Redis, the fake backend)


def profiled(make_instances, tables: dict, slots: int = 4, **changes):
    """An instance service whose settings declare these profiles, over a fake backend of `slots` 1g
    instances' worth of memory (its capacity, so memory() is slots GiB)."""
    s = Settings(**{**UNIT_SETTINGS, **changes, "profile_tables": tables})
    backend = FakeBackend(s.limits, slots=slots, profiles={n: p.limits for n, p in s.profile_table.items()})
    return make_instances(backend, profile_tables=tables, **changes)


async def test_a_start_gets_its_profiles_limits_and_is_recorded_with_it(make_instances):
    inst = profiled(make_instances, {"big": {"mem_limit": "2g", "env": {"COURSE": "ml"}}}, max_instances=0)
    handout = await inst.start(Order("a.csv", profile="big"), b"1\n")
    record = await inst.by_nonce(handout.nonce)
    given = inst.backend.limits_given[record.id]
    assert record.profile == "big" and (given.mem_limit, given.env) == ("2g", {"COURSE": "ml"})
    plain = await inst.by_nonce((await inst.start(Order("b.csv"), b"2\n")).nonce)
    assert plain.profile == "default" and inst.backend.limits_given[plain.id].mem_limit == "1g"


async def test_capacity_counts_memory_across_profiles(make_instances):
    """4 GiB of memory: a 4g instance takes all of it, as four 1g ones would."""
    inst = profiled(make_instances, {"big": {"mem_limit": "4g"}, "half": {"mem_limit": "2g"}}, max_instances=0)
    big = await inst.start(Order("a.csv", profile="big"), b"1\n")
    with pytest.raises(NoCapacity):
        await inst.start(Order("b.csv"), b"2\n")
    await inst.end(await inst.by_nonce(big.nonce), "test")
    for _ in range(2):
        await inst.start(Order("c.csv"), b"3\n")  # 2 GiB
    await inst.start(Order("d.csv", profile="half"), b"4\n")  # 4 GiB
    with pytest.raises(NoCapacity):
        await inst.start(Order("e.csv"), b"5\n")
    assert len(inst.backend.ids()) == 3


async def test_max_instances_stays_a_count(make_instances):
    inst = profiled(make_instances, {"big": {"mem_limit": "4g"}}, max_instances=2)
    await inst.start(Order("a.csv", profile="big"), b"1\n")
    await inst.start(Order("b.csv", profile="big"), b"2\n")  # 8g on a 4g fake: the operator's count rules
    with pytest.raises(NoCapacity):
        await inst.start(Order("c.csv"), b"3\n")


async def test_an_engine_smaller_than_one_instance_still_runs_one(make_instances):
    inst = profiled(make_instances, {"huge": {"mem_limit": "64g"}}, max_instances=0)
    await inst.start(Order("a.csv", profile="huge"), b"1\n")
    with pytest.raises(NoCapacity):
        await inst.start(Order("b.csv"), b"2\n")


async def test_each_profile_has_its_own_pool_and_a_start_claims_from_its_own(make_instances):
    tables = {"big": {"mem_limit": "2g", "pool_size": 1}, "bare": {"mem_limit": "2g"}}
    inst = profiled(make_instances, tables, slots=8, pool_size=1, max_instances=0)
    async with filling(inst):
        await until(lambda: pooled(inst, {"default": 1, "big": 1}))
        pool = {p: await inst.store.pool_ids([p]) for p in ("default", "big", "bare")}
        assert [len(ids) for ids in pool.values()] == [1, 1, 0]
        assert inst.backend.limits_given[pool["big"][0]].mem_limit == "2g"
        handout = await inst.start(Order("a.csv", profile="big"), b"1\n")
        assert (await inst.by_nonce(handout.nonce)).id == pool["big"][0]  # the warm one, not a boot
        assert await inst.store.pool_ids(["default"]) == pool["default"]  # the default's pool untouched
        await until(lambda: pooled(inst, {"default": 1, "big": 1}))  # refilled
        bare = await inst.start(Order("b.csv", profile="bare"), b"2\n")  # no pool: a cold boot
        assert (await inst.by_nonce(bare.nonce)).profile == "bare"
    assert len(inst.backend.starts) == 4


async def pooled(inst, sizes: dict[str, int]) -> bool:
    return [len(await inst.store.pool_ids([p])) for p in sizes] == list(sizes.values())


async def test_a_full_engine_fills_no_pool(make_instances):
    inst = profiled(make_instances, {"big": {"mem_limit": "4g", "pool_size": 1}}, slots=4, max_instances=0)
    await inst.start(Order("a.csv"), b"1\n")
    await PoolFiller(inst).fill()  # 1g taken: a 4g pool instance does not fit
    assert await inst.store.pool_ids(["big"]) == [] and len(inst.backend.starts) == 1


async def test_culling_ends_each_instance_by_its_profiles_times(make_instances, caplog):
    caplog.set_level(logging.INFO, logger="instances")
    inst = profiled(make_instances, {"short": {"max_age": 60, "idle_timeout": 30}}, max_age=3600)
    short = await inst.by_nonce((await inst.start(Order("a.csv", profile="short"), b"1\n")).nonce)
    plain = await inst.by_nonce((await inst.start(Order("b.csv"), b"2\n")).nonce)
    for record in (short, plain):  # both two minutes old, both in use a moment ago
        await inst.store.redis.set(f"unit:instance:{record.id}", replace(record, claimed=time.time() - 120).to_json())
    assert await Culler(inst, Activity()).round() == 1
    assert inst.backend.ids() == {plain.id} and (await inst.store.ended(short.id)).cause == "max_age"
    assert "older than profile 'short''s max_age (60 s)" in caplog.text


async def test_an_unpacked_archive_is_bounded_by_its_profiles_disk(make_instances, monkeypatch):
    inst = profiled(make_instances, {"big": {"disk_limit": "3g"}})
    bounds, unpack = [], inst.backend.unpack

    async def bounded(instance, kind, data, limits):
        bounds.append(limits.max_bytes)
        await unpack(instance, kind, data, limits)

    monkeypatch.setattr(inst.backend, "unpack", bounded)
    await inst.start(Order("a.zip", unpack="zip", profile="big"), b"PK")
    await inst.start(Order("b.zip", unpack="zip"), b"PK")
    assert bounds == [3 << 30, 1 << 30]
    assert inst.work.max_bytes > 3 << 30  # the work store takes the biggest profile's work


def test_the_instance_apis_deadlines_are_the_profiles(tmp_path):
    """lifetime.py reads the limits the culler ends by: each instance's profile's."""
    s = settings("[short]\nidle_timeout = 30\nmax_age = 60\n", tmp_path)
    assert lifetime_of(s, "short") == Lifetime(30, 60)
    assert lifetime_of(s, "default") == lifetime_of(s, "gone") == Lifetime(s.idle_timeout, s.max_age)


async def test_a_long_lived_profiles_work_record_and_owner_index_outlive_its_instance(make_instances):
    """Review of issue 20: the live work record (and the owner's index) expired by the default's
    max_age, so a profile living longer lost its work's record while it ran: its owner's cap no
    longer counted it, its work was unknown, the instance API forgot it."""
    month = 30 * 86400
    inst = profiled(make_instances, {"long": {"max_age": month}}, max_age=3600, work_ttl=3600)
    handed = await inst.start(Order("a.csv", profile="long", owner="alice"), b"1\n")
    for key in (f"unit:work:{handed.work}", "unit:owned:alice"):
        assert await inst.store.redis.ttl(key) > month, key


async def test_a_removed_profiles_pool_is_ended_after_a_restart_without_it(make_instances):
    """Review of issue 20: a profile taken out of the file leaves its warm pool behind the restart.
    No proxy refills or hands out its pool any more; culling ends its instances (nothing can reach
    them: unreachable), gives their memory back, and forgets the pool."""
    before = profiled(make_instances, {"gpu": {"mem_limit": "2g", "pool_size": 1}}, slots=8, max_instances=0)
    await PoolFiller(before).fill()
    await until(lambda: pooled(before, {"gpu": 1}))
    (orphan,) = await before.store.pool_ids(["gpu"])
    after = make_instances(before.backend, max_instances=0)  # restarted without the file's gpu profile
    record = await after.store.instance(orphan)
    assert record is not None and record.profile == "gpu"
    aged = replace(record, created=time.time() - 2 * after.settings.start_timeout)
    await after.store.redis.set(f"unit:instance:{orphan}", aged.to_json())
    await after.store.redis.zadd("unit:activity", {orphan: aged.created})
    assert await Culler(after, Activity()).round() == 1
    assert await after.store.instance(orphan) is None  # a pool instance was never handed out: no end note
    assert await after.store.pool_ids(["gpu"]) == [] and orphan not in after.backend.ids()
    assert not await after.store.redis.hexists("unit:units", orphan)
