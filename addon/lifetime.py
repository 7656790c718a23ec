"""How long an instance may idle and live, and when those limits end it: read in one place by the
culler (culler.py) and the instance API (instance_info.py), so what the API announces is what the
culler does."""

from __future__ import annotations

from dataclasses import dataclass

from backends import Instance
from config import Settings


@dataclass(frozen=True)
class Lifetime:
    idle_timeout: int  # seconds without a person's activity
    max_age: int  # seconds from the hand-out, however busy


def lifetime_of(settings: Settings, profile: str) -> Lifetime:
    """The limits of an instance of this profile (profiles.py; an undeclared one: the default's)."""
    declared = settings.profile(profile)
    return Lifetime(declared.idle_timeout, declared.max_age)


def deadlines(instance: Instance, last_activity: float | None, lifetime: Lifetime) -> tuple[float, float]:
    """When idle culling and max age would end the instance (unix times), by the culler's rules:
    its age counts from the hand-out, its idleness from the last activity recorded (else the hand-out).
    The culler ends it at its first round past either."""
    handed_out = instance.claimed or instance.created
    last = handed_out if last_activity is None else last_activity
    return last + lifetime.idle_timeout, handed_out + lifetime.max_age
