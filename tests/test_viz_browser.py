"""The `epicycle viz` HTML page in a real browser: Debian's Chromium, headless, through playwright.

Every node is rendered; clicking one shows its resolved config, parameter count and FLOPs;
hovering an edge shows its kind, ratio and delay; the search box finds nodes; the errors of an
invalid spec sit at their nodes; and no request ever leaves the page. Screenshots go to tmp_path.
Without /usr/bin/chromium or the `playwright` package the tests skip, saying which is missing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compiler.tools.cli import app
from tests.conftest import ROOT
from tests.test_viz import BROKEN

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

if not CHROMIUM.exists():
    pytest.skip("no /usr/bin/chromium (Debian: apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the playwright package is not installed (pip install playwright)"
)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        browser.close()


def open_page(browser, html: Path):
    """A page on `html` that records every request and every script error."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.requests, page.script_errors = [], []
    page.on("request", lambda request: page.requests.append(request.url))
    page.on("pageerror", lambda error: page.script_errors.append(str(error)))
    page.goto(html.as_uri())
    page.wait_for_selector("body[data-ready='1']")
    return page


def draw(spec: Path, out: Path, *extra: str) -> int:
    return CliRunner().invoke(app, ["viz", str(spec), "-o", str(out), *extra]).exit_code


def hover_edge(page, edge_id: str) -> str:
    """Move the mouse onto the middle of an edge's curve and read the tooltip."""
    x, y = page.evaluate(
        """(id) => {
            const path = document.querySelector(`g.edge[data-id="${id}"] path.hit`);
            const p = path.getPointAtLength(path.getTotalLength() / 2);
            const m = path.getScreenCTM();
            return [p.x * m.a + p.y * m.c + m.e, p.x * m.b + p.y * m.d + m.f];
        }""",
        edge_id,
    )
    page.mouse.move(x, y)
    page.wait_for_selector("#tooltip", state="visible")
    return page.inner_text("#tooltip")


def test_the_gear_train_page_shows_nodes_details_edges_and_search(browser, tmp_path):
    html = tmp_path / "gear_train.html"
    assert draw(ROOT / "specs" / "gear_train.yaml", html) == 0
    page = open_page(browser, html)

    ids = page.eval_on_selector_all("g.node", "gs => gs.map(g => g.dataset.id)")
    assert sorted(ids) == sorted(
        ["inputs.t", "nodes.sun", "nodes.moon", "nodes.venus", "nodes.mars", "nodes.dial"]
        + ["outputs.longitude"]
    )
    for node_id in ids:  # rendered: laid out with a real size, inside the page
        box = page.locator(f'g.node[data-id="{node_id}"]').bounding_box()
        assert box is not None and box["width"] > 50 and box["height"] > 30

    page.click('g.node[data-id="nodes.venus"] text')
    details = page.inner_text("#details")
    assert details.startswith("venus (gear)")
    assert "parameters\t99,136" in details
    assert "FLOPs per token\t688,128" in details
    assert "velocity\t223/51" in details and "teeth\t51" in details
    assert "resolved config" in details and "heads\t4" in details and "mlp_width\t256" in details
    assert page.locator('g.node.selected[data-id="nodes.venus"]').count() == 1

    assert hover_edge(page, "edges.1") == "sun → venus: mesh · ratio 223/51 · delay 0"
    assert hover_edge(page, "edges.6") == "moon → sun: feedback · ratio 19/254 · delay 1"

    page.fill("#search", "ar")  # only mars holds "ar"
    assert page.inner_text("#matches") == "1 match"
    assert page.eval_on_selector_all("g.node.match", "gs => gs.map(g => g.dataset.id)") == [
        "nodes.mars"
    ]
    page.fill("#search", "gear")  # a kind finds all its nodes
    assert page.inner_text("#matches") == "4 matches"
    page.press("#search", "Enter")
    assert page.inner_text("#details").startswith("sun (gear)")

    before = page.get_attribute("#viewport", "transform")
    page.mouse.move(500, 400)
    page.mouse.wheel(0, -400)
    page.mouse.down()
    page.mouse.move(600, 450)
    page.mouse.up()
    assert page.get_attribute("#viewport", "transform") != before  # zoomed and panned

    page.screenshot(path=str(tmp_path / "gear_train.png"))
    assert (tmp_path / "gear_train.png").stat().st_size > 10_000
    assert page.requests == [html.as_uri()]  # nothing but the page itself
    assert page.script_errors == []
    page.close()


def test_an_invalid_spec_page_renders_with_the_errors_at_their_nodes(browser, tmp_path):
    spec = tmp_path / "broken.yaml"
    spec.write_text(BROKEN.lstrip())
    html = tmp_path / "broken.html"
    assert draw(spec, html, "--errors") == 1  # written, and still an invalid spec
    page = open_page(browser, html)
    ids = page.eval_on_selector_all("g.node", "gs => gs.map(g => g.dataset.id)")
    assert sorted(ids) == sorted(
        ["inputs.tokens", "nodes.a", "nodes.b", "nodes.c", "nodes.nowhere", "outputs.logits"]
    )
    issues = page.locator("#issues .issue")
    assert issues.count() == 3
    assert "`heads: 5` does not divide node `a`'s width 64" in page.inner_text("#issues")
    page.locator("#issues .issue", has_text="heads: 5").click()
    details = page.inner_text("#details")
    assert details.startswith("a (transformer)") and "heads: 5" in details
    assert "as written\nkind\ttransformer\nwidth\t64\nheads\t5" in details
    page.screenshot(path=str(tmp_path / "broken.png"))
    assert page.requests == [html.as_uri()]
    assert page.script_errors == []
    page.close()


def test_a_large_mechanism_renders_every_gear(browser, tmp_path):
    if shutil.which("dot") is None:
        pytest.skip("Graphviz `dot` is not installed; the Python layout is tested in test_viz")
    html = tmp_path / "antikythera.html"
    assert draw(ROOT / "specs" / "antikythera.yaml", html) == 0
    page = open_page(browser, html)
    assert page.locator("g.node").count() == 39 + 1 + 2
    assert page.locator("g.group").count() > 5
    page.click('g.node[data-id="nodes.e3"] text')
    assert "velocity\t477/4237" in page.inner_text("#details")
    page.screenshot(path=str(tmp_path / "antikythera.png"))
    assert page.requests == [html.as_uri()] and page.script_errors == []
    page.close()


def drawn_nodes(page) -> set[str]:
    return set(page.eval_on_selector_all("g.node", "gs => gs.map(g => g.dataset.id)"))


def test_a_sub_graph_box_closes_to_one_node_and_opens_again(browser, tmp_path):
    html = tmp_path / "sky.html"
    assert draw(ROOT / "specs" / "federation_of_federations.yaml", html) == 0
    page = open_page(browser, html)
    train = {f"nodes.outer.train_a.{g}" for g in ("driver", "idler", "follower")}
    train.add("outputs.outer.train_a.phase")
    everything = drawn_nodes(page)
    assert len(everything) == 19 and train <= everything  # small enough: all open at load
    assert page.locator("g.frame").count() == 6

    page.click('g.toggle[data-id="graphs.outer.train_a"]')  # − on its frame: close it
    closed = drawn_nodes(page)
    assert closed == (everything - train) | {"graphs.outer.train_a"}
    assert page.locator('g.frame[data-id="graphs.outer.train_a"]').count() == 0
    box = page.text_content('g.node[data-id="graphs.outer.train_a"]')
    assert "graph · 3 nodes · 1 output" in box and "37.60K params" in box
    # the mesh out of the closed train now leaves its box; its tooltip still names the gear
    assert hover_edge(page, "edges.9").startswith("outer.train_a.follower → outer.train_b.driver")

    page.click('g.node[data-id="graphs.outer.train_a"] text')  # the box itself: its counts
    details = page.inner_text("#details")
    assert details.startswith("outer.train_a (sub-graph, closed)")
    assert "parameters\t37,602" in details

    page.click('g.toggle[data-id="graphs.outer.train_a"]')  # + on the box: open it again
    assert drawn_nodes(page) == everything
    assert page.locator('g.frame[data-id="graphs.outer.train_a"]').count() == 1

    page.click('g.toggle[data-id="graphs.outer"]')  # a whole planet, trains and all
    assert drawn_nodes(page) == {n for n in everything if ".outer." not in n} | {"graphs.outer"}
    page.fill("#search", "outer.train_b.idler")  # found inside the closed planet: its box lights
    assert page.eval_on_selector_all("g.node.match", "gs => gs.map(g => g.dataset.id)") == [
        "graphs.outer"
    ]
    page.press("#search", "Enter")  # Enter opens the boxes around it and selects it
    assert "nodes.outer.train_b.idler" in drawn_nodes(page)
    assert page.inner_text("#details").startswith("outer.train_b.idler (gear)")
    page.screenshot(path=str(tmp_path / "sky.png"))
    assert page.requests == [html.as_uri()] and page.script_errors == []
    page.close()
