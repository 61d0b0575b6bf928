"""The interactive page: one self-contained HTML file (inline SVG, CSS and JS; no network at all).

Drag to pan, wheel or the buttons to zoom, click a node (or an edge) for its resolved config,
parameter count and FLOPs; hover an edge for its kind, ratio and delay; type in the search box to
find nodes (Enter centres the first match). With `--errors`, every located diagnostic is listed and
marked on the node it concerns; clicking one selects that node.

Sub-graphs are boxes with a button: − closes one (it becomes a single box with its node and
parameter counts, and the edges into its inside end at it), + opens it again; clicking the box
shows its counts, with the same button. Each set of open sub-graphs is a drawing of its own,
laid out in Python and stored in the page (`views.py` says which, and which are open at load);
the page swaps them, keeping the box just clicked where it was on the screen. Finding a node
inside a closed box (Enter, or clicking its issue) opens the boxes around it.

The data the page shows is the scene itself, serialised as JSON into a `<script type=
"application/json">` (never evaluated as code: `JSON.parse`), with `<` escaped so no spec text can
close the script element.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from xml.sax.saxutils import escape

from compiler.tools.viz.draw import Figure
from compiler.tools.viz.scene import Scene
from compiler.tools.viz.svg import to_svg
from compiler.tools.viz.views import Views, plan_views, view_key, view_scene

CSS = """
* { box-sizing: border-box; }
body { margin: 0; font: 13px/1.4 "DejaVu Sans", Verdana, Arial, sans-serif; color: #1a202c;
  display: grid; grid-template-columns: 1fr 360px; grid-template-rows: auto 1fr; height: 100vh; }
header { grid-column: 1 / 3; display: flex; gap: 12px; align-items: center; padding: 8px 12px;
  border-bottom: 1px solid #e2e8f0; background: #f7fafc; }
header h1 { font-size: 16px; margin: 0; }
header .summary { color: #4a5568; }
header .engine { color: #718096; margin-left: auto; font-size: 12px; }
#search { width: 220px; padding: 4px 8px; border: 1px solid #cbd5e0; border-radius: 4px; }
#matches { color: #4a5568; min-width: 70px; }
button { border: 1px solid #cbd5e0; background: #fff; border-radius: 4px; padding: 2px 9px;
  cursor: pointer; font-size: 14px; }
#canvas { overflow: hidden; position: relative; cursor: grab; background: #fff; }
#canvas.dragging { cursor: grabbing; }
#canvas > svg { position: absolute; left: 0; top: 0; width: 100%; height: 100%; }
aside { border-left: 1px solid #e2e8f0; overflow: auto; padding: 10px 12px; background: #fcfcfd; }
aside h2 { font-size: 14px; margin: 6px 0; }
#details table { border-collapse: collapse; width: 100%; font-size: 12px; }
#details td { border-top: 1px solid #edf2f7; padding: 2px 4px; vertical-align: top;
  word-break: break-word; }
#details td.key { color: #4a5568; white-space: nowrap; }
#details .hint { color: #718096; }
.issue { color: #c53030; cursor: pointer; margin: 4px 0; font-size: 12px; }
.issue.warning { color: #b7791f; }
.issue .help { color: #4a5568; display: block; }
g.node, g.edge, g.frame, g.toggle { cursor: pointer; }
g.toggle:hover rect { fill: #ebf4ff; }
#subgraphs { color: #4a5568; font-size: 12px; }
#details button.toggle-frame { margin: 6px 0; font-size: 12px; }
g.node.selected > rect:first-child { stroke-width: 4; filter: drop-shadow(0 0 4px #3182ce); }
g.node.match > rect:first-child { stroke: #d53f8c; stroke-width: 4; }
svg.searching g.node:not(.match) { opacity: 0.35; }
g.edge:hover path:not(.hit) { stroke-width: 4; }
g.edge .hit { pointer-events: stroke; }
#tooltip { position: fixed; pointer-events: none; background: #1a202c; color: #fff;
  padding: 3px 7px; border-radius: 4px; font-size: 12px; display: none; white-space: nowrap; }
"""

JS = r"""
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("scene-data").textContent);
  const items = {};
  for (const n of data.nodes) items[n.id] = n;
  for (const e of data.edges) items[e.id] = e;
  const frames = {};
  for (const f of data.frames) { frames[f.path] = f; items[f.id] = f; }
  const opened = new Set(data.opened);
  const canvas = document.getElementById("canvas");
  const svg = canvas.querySelector("svg");
  const view = svg.querySelector("#viewport");
  const details = document.getElementById("details");
  const tooltip = document.getElementById("tooltip");
  const search = document.getElementById("search");
  const matches = document.getElementById("matches");
  const size = { w: data.width, h: data.height };
  let t = { x: 0, y: 0, k: 1 };

  function apply() { view.setAttribute("transform", `translate(${t.x},${t.y}) scale(${t.k})`); }
  function fit() {
    const r = canvas.getBoundingClientRect();
    const k = Math.min(r.width / size.w, r.height / size.h, 1.5) * 0.97;
    t = { k: k, x: (r.width - size.w * k) / 2, y: (r.height - size.h * k) / 2 };
    apply();
  }
  function zoomAt(factor, cx, cy) {
    const k = Math.max(0.05, Math.min(8, t.k * factor));
    t.x = cx - (cx - t.x) * (k / t.k); t.y = cy - (cy - t.y) * (k / t.k); t.k = k; apply();
  }
  canvas.addEventListener("wheel", (ev) => {
    ev.preventDefault();
    const r = canvas.getBoundingClientRect();
    zoomAt(Math.exp(-ev.deltaY * 0.0015), ev.clientX - r.left, ev.clientY - r.top);
  }, { passive: false });
  let drag = null;
  canvas.addEventListener("mousedown", (ev) => {
    drag = { x: ev.clientX, y: ev.clientY, tx: t.x, ty: t.y, moved: false };
  });
  window.addEventListener("mousemove", (ev) => {
    if (!drag) return;
    const dx = ev.clientX - drag.x, dy = ev.clientY - drag.y;
    if (Math.abs(dx) + Math.abs(dy) > 3) { drag.moved = true; canvas.classList.add("dragging"); }
    t.x = drag.tx + dx; t.y = drag.ty + dy; apply();
  });
  window.addEventListener("mouseup", () => {
    canvas.classList.remove("dragging");
    setTimeout(() => { drag = null; }, 0);
  });
  function drawn(id) {
    return svg.querySelector(`g.node[data-id="${CSS.escape(id)}"], ` +
                             `g.frame[data-id="${CSS.escape(id)}"]`);
  }
  function chainOf(id) {  // the frames around a node or a sub-graph, outermost first
    const item = items[id];
    let at = !item ? null : item.role === "graph" ? item.parent : item.frame;
    const chain = [];
    while (at) { chain.unshift(at); at = frames[at].parent; }
    return chain;
  }
  function shown(id) {  // what stands for a node now: itself, or the closed box around it
    if (drawn(id)) return drawn(id);
    for (const path of chainOf(id)) {
      const box = drawn("graphs." + path);
      if (box && box.matches("g.node")) return box;
    }
    return null;
  }
  function keyOf(open) {
    const on = [];
    for (const f of data.frames) {
      if (open.has(f.path) && (!f.parent || on.includes(f.parent))) on.push(f.path);
    }
    return on.join("|");
  }
  function showView(anchor) {
    const key = keyOf(opened);
    const v = data.views[key];
    if (!v) return false;
    const before = anchor && drawn(anchor) ? drawn(anchor).getBoundingClientRect() : null;
    const doc = new DOMParser().parseFromString(
      `<svg xmlns="http://www.w3.org/2000/svg">${v.svg}</svg>`, "image/svg+xml");
    view.replaceChildren(...Array.from(doc.documentElement.childNodes,
                                       (n) => document.importNode(n, true)));
    size.w = v.width; size.h = v.height;
    svg.dataset.view = key;
    const after = before && drawn(anchor) ? drawn(anchor).getBoundingClientRect() : null;
    if (after) { t.x += before.left - after.left; t.y += before.top - after.top; apply(); }
    const selected = details.dataset.selected;
    if (selected && drawn(selected)) drawn(selected).classList.add("selected");
    if (search.value.trim()) find();
    if (selected && items[selected] && items[selected].role === "graph") select(selected);
    return true;
  }
  function toggle(path) {
    if (!frames[path] || !frames[path].openable) return;
    const was = opened.has(path);
    if (was) opened.delete(path); else opened.add(path);
    if (!showView("graphs." + path)) { if (was) opened.add(path); else opened.delete(path); }
  }
  function reveal(id) {  // open the boxes around a node so that it is drawn
    let changed = false;
    for (const path of chainOf(id)) {
      if (!opened.has(path) && frames[path].openable) { opened.add(path); changed = true; }
    }
    if (changed) showView(null);
  }
  function centreOn(id) {
    const g = shown(id);
    if (!g) return;
    const b = g.getBBox(), r = canvas.getBoundingClientRect();
    t.x = r.width / 2 - (b.x + b.width / 2) * t.k; t.y = r.height / 2 - (b.y + b.height / 2) * t.k;
    apply();
  }
  document.getElementById("zoom-in").onclick = () => {
    const r = canvas.getBoundingClientRect(); zoomAt(1.25, r.width / 2, r.height / 2);
  };
  document.getElementById("zoom-out").onclick = () => {
    const r = canvas.getBoundingClientRect(); zoomAt(0.8, r.width / 2, r.height / 2);
  };
  document.getElementById("zoom-fit").onclick = fit;

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  }
  function value(v) {
    if (v === null || v === undefined) return "-";
    if (typeof v === "number") return v.toLocaleString("en-US");
    if (typeof v === "object") return JSON.stringify(v);
    return String(v);
  }
  function table(obj) {
    const tb = el("table");
    for (const [k, v] of Object.entries(obj)) {
      if (v && typeof v === "object" && !Array.isArray(v)) {
        const row = tb.insertRow(); const c = row.insertCell(); c.colSpan = 2;
        c.appendChild(el("b", k)); c.appendChild(table(v));
        continue;
      }
      const row = tb.insertRow();
      row.insertCell().textContent = k; row.cells[0].className = "key";
      row.insertCell().textContent = Array.isArray(v) ? v.map(value).join("; ") : value(v);
    }
    return tb;
  }
  function issuesOf(item, into) {
    for (const i of item.issues) {
      const d = el("div", `${i.where}: ${i.severity}: ${i.message}`, "issue " + i.severity);
      if (i.hint) d.appendChild(el("span", "help: " + i.hint, "help"));
      into.appendChild(d);
    }
  }
  function select(id) {
    for (const g of svg.querySelectorAll(".selected")) g.classList.remove("selected");
    const item = items[id];
    if (!item) return;
    const g = svg.querySelector(`g.node[data-id="${CSS.escape(id)}"], g.edge[data-id="${CSS.escape(id)}"]`);
    if (g) g.classList.add("selected");
    details.replaceChildren();
    details.dataset.selected = id;
    if (item.role === "graph") {
      const isOpen = opened.has(item.path) && !!drawn(id) && drawn(id).matches("g.frame");
      details.appendChild(el("h2", `${item.path} (sub-graph, ${isOpen ? "open" : "closed"})`));
      details.appendChild(table(item.details));
      if (item.openable) {
        const b = el("button", isOpen ? "close this sub-graph" : "open this sub-graph", "toggle-frame");
        b.onclick = () => toggle(item.path);
        details.appendChild(b);
      } else {
        details.appendChild(el("p", "drawn closed on this page (past its views); " +
                                    "the .svg draws it open", "hint"));
      }
      return;
    }
    if ("source" in item) {
      details.appendChild(el("h2", `edge ${items[item.source].name} → ${items[item.target].name}`));
      details.appendChild(table({ kind: item.kind || item.role, ratio: item.ratio, delay: item.delay,
                                  from: item.source, to: item.target }));
    } else {
      details.appendChild(el("h2", `${item.name} (${item.kind || item.role})`));
      const d = Object.assign({}, item.details);
      const summary = {};
      for (const key of ["parameters", "FLOPs per token", "batch group", "velocity", "teeth"]) {
        if (key in d) { summary[key] = d[key]; delete d[key]; }
      }
      details.appendChild(table(summary));
      issuesOf(item, details);
      if (d.config) { details.appendChild(el("h2", "resolved config")); details.appendChild(table(d.config)); delete d.config; }
      if (Object.keys(d).length) { details.appendChild(el("h2", "spec")); details.appendChild(table(d)); }
    }
    if ("source" in item) issuesOf(item, details);
  }
  svg.addEventListener("click", (ev) => {
    if (drag && drag.moved) return;
    const button = ev.target.closest("g.toggle");
    if (button) { toggle(button.dataset.id.slice("graphs.".length)); return; }
    const g = ev.target.closest("g.node, g.edge, g.frame");
    if (g) select(g.dataset.id);
  });
  svg.addEventListener("mouseover", (ev) => {
    const g = ev.target.closest("g.edge");
    if (!g) return;
    const e = items[g.dataset.id];
    tooltip.textContent = `${items[e.source].name} → ${items[e.target].name}: ${e.kind || e.role}` +
      ` · ratio ${e.ratio || "-"} · delay ${e.delay}` + (e.issues.length ? ` · ${e.issues.length} issue(s)` : "");
    tooltip.style.display = "block";
  });
  svg.addEventListener("mousemove", (ev) => {
    tooltip.style.left = ev.clientX + 14 + "px"; tooltip.style.top = ev.clientY + 12 + "px";
  });
  svg.addEventListener("mouseout", (ev) => {
    if (ev.target.closest("g.edge")) tooltip.style.display = "none";
  });
  function find() {
    const q = search.value.trim().toLowerCase();
    for (const g of svg.querySelectorAll("g.node.match")) g.classList.remove("match");
    if (!q) { svg.classList.remove("searching"); matches.textContent = ""; return []; }
    const found = data.nodes.filter((n) => n.name.toLowerCase().includes(q) ||
                                           (n.kind || "").toLowerCase() === q);
    for (const n of found) { const g = shown(n.id); if (g) g.classList.add("match"); }
    svg.classList.add("searching");
    matches.textContent = `${found.length} match${found.length === 1 ? "" : "es"}`;
    return found;
  }
  search.addEventListener("input", find);
  search.addEventListener("keydown", (ev) => {
    if (ev.key !== "Enter") return;
    let found = find();
    if (found.length) { reveal(found[0].id); found = find(); centreOn(found[0].id); select(found[0].id); }
  });
  const list = document.getElementById("issues");
  for (const item of [{ id: null, issues: data.issues }, ...data.nodes, ...data.edges]) {
    for (const i of item.issues) {
      const d = el("div", `${i.where}: ${i.severity}: ${i.message}`, "issue " + i.severity);
      if (i.hint) d.appendChild(el("span", "help: " + i.hint, "help"));
      if (item.id) d.onclick = () => { reveal(item.id); centreOn(item.id); select(item.id); };
      list.appendChild(d);
    }
  }
  if (!list.children.length) list.previousElementSibling.style.display = "none";
  window.addEventListener("resize", fit);
  fit();
  document.body.dataset.ready = "1";
})();
"""


def to_html(
    scene: Scene,
    figure: Figure,
    views: Views | None = None,
    *,
    engine: str = "auto",
    show_issues: bool = True,
) -> str:
    """The page of `scene`, opening on `figure`; with sub-graphs, `views` are the other drawings
    it holds (each laid out with `engine`), one per set of open sub-graphs."""
    body = _svg_body(figure)
    inner = f'<svg xmlns="http://www.w3.org/2000/svg"><g id="viewport">{body}</g></svg>'
    inside = {m: f.path for f in scene.frames for m in f.members}
    views = views if views is not None else plan_views(scene)
    drawings = {}
    if scene.frames:
        from compiler.tools.viz import figure_of

        first = view_key(scene, views.default)
        drawings[first] = {"svg": body, "width": figure.width, "height": figure.height}
        for state in views.states:
            key = view_key(scene, state)
            if key not in drawings:
                drawn = figure_of(
                    view_scene(scene, state),
                    engine,
                    show_issues=show_issues,
                    toggles=views.openable,
                )
                drawings[key] = {
                    "svg": _svg_body(drawn),
                    "width": drawn.width,
                    "height": drawn.height,
                }
    payload = {
        "title": scene.title,
        "width": figure.width,
        "height": figure.height,
        "engine": figure.engine,
        "nodes": [{**asdict(n), "frame": inside.get(n.id)} for n in scene.nodes],
        "edges": [{**asdict(e), "label": e.label} for e in scene.edges if not e.folded],
        "issues": [asdict(i) for i in scene.issues],
        "frames": [
            {
                "id": f.id,
                "path": f.path,
                "name": f.path,
                "parent": f.parent,
                "role": "graph",
                "kind": "graph",
                "details": f.details,
                "issues": [],
                "openable": f.path in views.openable,
            }
            for f in scene.frames
        ],
        "opened": sorted(views.default),
        "views": drawings,
    }
    data = json.dumps(payload, ensure_ascii=False).replace("<", "\\u003c")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:">
<title>{escape(scene.title)} · epicycle viz</title>
<style>{CSS}</style>
</head>
<body>
<header>
  <h1>{escape(scene.title)}</h1><span class="summary">{escape(scene.summary)}</span>
  <input id="search" type="search" placeholder="find a node…" aria-label="find a node">
  <span id="matches"></span>
  <button id="zoom-in" title="zoom in">+</button><button id="zoom-out" title="zoom out">−</button>
  <button id="zoom-fit" title="fit the graph">fit</button>
  <span class="engine">layout: {escape(figure.engine)}</span>
</header>
<main id="canvas">{inner}</main>
<aside>
  <h2>details</h2>
  <div id="details"><p class="hint">Click a node or an edge; hover an edge; drag to pan, wheel to zoom.</p></div>
{_subgraph_note(scene, views)}
  <h2>issues</h2>
  <div id="issues"></div>
</aside>
<div id="tooltip"></div>
<script type="application/json" id="scene-data">{data}</script>
<script>{JS}</script>
</body>
</html>
"""


def _svg_body(figure: Figure) -> str:
    """The drawing without its `<svg>` element: it goes inside a group the page pans and zooms."""
    _, _, rest = to_svg(figure).partition(">")
    body, _, _ = rest.rpartition("</svg>")
    return body


def _subgraph_note(scene: Scene, views: Views) -> str:
    if not scene.frames:
        return ""
    text = (
        f"{len(scene.frames)} sub-graph{'s' * (len(scene.frames) != 1)}: − on a box closes it, "
        "+ opens it; click a box for its counts."
    )
    if views.fixed:
        text += (
            f" {len(views.fixed)} of them stay closed here (this page holds at most "
            f"{views.limit} drawings); the .svg and .png draw every sub-graph open."
        )
    return f'  <p id="subgraphs">{escape(text)}</p>'
