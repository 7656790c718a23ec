"""A datalab for data: the image's data stack at work on an upload, as a user's notebook would use it,
through the proxy (real mitmdump, Redis, Docker and Jupyter) in one instance for the whole file."""

from __future__ import annotations

import base64

import pytest

from e2e.proxy import Browser

CSV = b"region,units,price\nnorth,3,2.5\nsouth,4,10\neast,5,1.25\n"
READ = "import pandas as pd\ndf = pd.read_csv('sales.csv')\n"


@pytest.fixture(scope="module")
def notebook(proxy) -> tuple[Browser, str]:
    """The upload opened in a browser session, and one kernel in its instance."""
    browser = Browser(proxy)
    browser.view(proxy.start_instance("sales.csv", CSV))
    return browser, browser.start_kernel()


def run(notebook: tuple[Browser, str], code: str, displays: list[dict] | None = None) -> str:
    """The last line the code prints (a first import may print notices before it)."""
    browser, kernel = notebook
    return browser.execute(kernel, READ + code, displays=displays).strip().splitlines()[-1]


def test_pandas_reads_the_upload(notebook):
    code = "print(len(df), df['units'].sum(), (df['units'] * df['price']).sum())"
    assert run(notebook, code) == "3 12 53.75"


def test_scipy_fits_the_data(notebook):
    code = "from scipy import stats\nprint(round(stats.pearsonr(df['units'], [6, 8, 10]).statistic, 6))"
    assert run(notebook, code) == "1.0"


def test_parquet_round_trip_with_pyarrow(notebook):
    code = (
        "import pyarrow.parquet as pq\n"
        "df.to_parquet('sales.parquet', engine='pyarrow')\n"
        "print(pq.read_table('sales.parquet').num_rows, pd.read_parquet('sales.parquet').equals(df))"
    )
    assert run(notebook, code) == "3 True"


def test_excel_round_trip_with_openpyxl(notebook):
    code = (
        "import openpyxl\n"
        "df.to_excel('sales.xlsx', index=False, engine='openpyxl')\n"
        "sheet = openpyxl.load_workbook('sales.xlsx').active\n"
        "print(sheet['A3'].value, pd.read_excel('sales.xlsx').equals(df))"
    )
    assert run(notebook, code) == "south True"


def test_matplotlib_plot_shows_inline_as_png(notebook):
    displays: list[dict] = []
    run(notebook, "ax = df.plot.bar(x='region', y='units')\nprint('plotted')", displays)
    pngs = [d["data"]["image/png"] for d in displays if "image/png" in d["data"]]
    assert len(pngs) == 1, f"display_data sent: {[sorted(d['data']) for d in displays]}"
    assert base64.b64decode(pngs[0]).startswith(b"\x89PNG\r\n\x1a\n")
