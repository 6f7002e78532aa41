"""``report.html`` of ``specops analyze``: one self-contained file (figures embedded, no external
references) that a headless Chromium renders with its figures and numbers."""

import base64
import html.parser
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from specops import cli  # noqa: E402
from specops.cli import report  # noqa: E402

#: matplotlib's first two colours (the density line, the block bars): present only in the figures.
BLUE, ORANGE = (31, 119, 180), (255, 127, 14)


def tiny_model():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(64, 6), torch.nn.Tanh(), torch.nn.Linear(6, 10)).double()


def tiny_data():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return [(X[:40] / 16.0, y[:40]), (X[40:70] / 16.0, y[40:70])]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("html") / "out")
    code = cli.main(["analyze", "--model", "test_report_html:tiny_model", "--data", "test_report_html:tiny_data",
                     "--top-k", "2", "--trace-matvecs", "30", "--block-trace-matvecs", "9", "--esd-probes", "2",
                     "--esd-steps", "8", "--landscape", "1d", "--landscape-directions", "filter",
                     "--landscape-steps", "5", "--no-progress", "--out", out])
    assert code == 0
    return out


class Page(html.parser.HTMLParser):
    """The tags and attributes of a page, and its text."""

    def __init__(self):
        super().__init__()
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(text):
    page = Page()
    page.feed(text)
    return page


def expected_numbers(out):
    """The summary table's value cells, as results.json gives them."""
    with open(os.path.join(out, "results.json")) as fh:
        data = json.load(fh)
    return [row[1] for row in report.summary_rows(data)], data


def test_report_is_self_contained(run_dir):
    with open(os.path.join(run_dir, "report.html")) as fh:
        text = fh.read()
    page = parse(text)
    imgs = [a for t, a in page.tags if t == "img"]
    assert [a["data-file"] for a in imgs] == ["esd.png", "landscape.png", "blocks.png"]
    for a in imgs:           # each figure is the PNG written beside it, embedded byte for byte
        prefix = "data:image/png;base64,"
        assert a["src"].startswith(prefix)
        with open(os.path.join(run_dir, a["data-file"]), "rb") as fh:
            assert base64.b64decode(a["src"][len(prefix):]) == fh.read()
    # nothing to fetch: no scripts, stylesheets, frames or links to other files
    assert not any(t in ("script", "link", "iframe", "object", "embed") for t, _ in page.tags)
    refs = [v for _, a in page.tags for k, v in a.items() if k in ("src", "href")]
    assert all(v.startswith("data:") for v in refs), refs
    values, data = expected_numbers(run_dir)
    body = "".join(page.text)
    for value in values:
        assert value in body, value
    for library, version in data["versions"].items():
        assert library in body and version in body
    assert data["settings"]["model"] in body
    # the reading of its own numbers, the trace's target, and no unset setting shown as None
    for sentence in report.reading(data):
        assert sentence in body, sentence
    assert "of the eigenvalues are at or below 0" in body and "target 2 %" in body
    assert "None" not in body


def chromium():
    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if exe is None:
        message = "headless Chromium is not installed (apt-get install -y chromium); .ci/run installs it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return exe


def headless(exe, tmp_path, *args):
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, timeout=120, check=False)


def colour_pixels(png, rgb, tol=12):
    import matplotlib.image

    img = (matplotlib.image.imread(png)[..., :3] * 255).astype(int)
    return int(np.sum(np.all(np.abs(img - np.array(rgb)) <= tol, axis=-1)))


def test_chromium_renders_the_figures_and_numbers(run_dir, tmp_path):
    exe = chromium()
    page = os.path.join(run_dir, "report.html")
    p = headless(exe, tmp_path, "--dump-dom", f"file://{page}")
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    dom = parse(p.stdout.decode())
    assert sum(t == "img" for t, _ in dom.tags) == 3
    values, _ = expected_numbers(run_dir)
    text = "".join(dom.text)
    for value in values:
        assert value in text, value

    # the screenshot shows the figures: their colours are there, and absent when the images are removed
    shot = tmp_path / "report.png"
    p = headless(exe, tmp_path, f"--screenshot={shot}", "--window-size=1100,3200", f"file://{page}")
    assert p.returncode == 0 and shot.exists(), p.stderr.decode()[-2000:]
    with open(page) as fh:
        bare = fh.read()
    for a in (a for t, a in parse(bare).tags if t == "img"):
        bare = bare.replace(a["src"], "")
    (tmp_path / "bare.html").write_text(bare)
    bare_shot = tmp_path / "bare.png"
    p = headless(exe, tmp_path, f"--screenshot={bare_shot}", "--window-size=1100,3200",
                 f"file://{tmp_path / 'bare.html'}")
    assert p.returncode == 0 and bare_shot.exists()
    blue, orange = colour_pixels(shot, BLUE), colour_pixels(shot, ORANGE)
    assert blue > 2000 and orange > 2000, (blue, orange)
    assert colour_pixels(bare_shot, BLUE) < 50 and colour_pixels(bare_shot, ORANGE) < 50
