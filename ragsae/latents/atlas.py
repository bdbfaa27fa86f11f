"""A latent atlas: one self-contained HTML file (inline CSS and JavaScript, no network) with a searchable
list of an index's latents (label, frequency) and each latent's card: top contexts with the firing
token highlighted, activation histogram, characteristic and logit-lens tokens, nearest latents."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from ..storage import write_text_atomic
from .catalog import LatentCatalog

ATLAS_DATA_ID = "atlas-data"
"""Id of the <script type="application/json"> element that holds the catalog."""


def script_json(data: Any) -> str:
    """JSON safe inside a <script> element: '<' and '/' escaped (JSON.parse reads them back), so that
    no text from the corpus can close the element or read as a URL to fetch."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace("/", "\\/")


_STYLE = """
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1d1d1f;background:#f6f6f8}
header{padding:10px 18px;background:#24283b;color:#fff}
header h1{font-size:18px;margin:0 0 2px}
header p{margin:0;color:#c8cbe0;font-size:12px}
main{display:flex;height:calc(100vh - 58px)}
nav{width:360px;min-width:260px;border-right:1px solid #ddd;display:flex;flex-direction:column;background:#fff}
nav .tools{padding:10px;border-bottom:1px solid #eee;display:flex;gap:6px;flex-wrap:wrap}
nav input{flex:1;min-width:150px;padding:6px 8px;border:1px solid #bbb;border-radius:4px;font:inherit}
nav select{padding:5px;border:1px solid #bbb;border-radius:4px;font:inherit}
#count{padding:4px 10px;color:#666;font-size:12px}
#list{list-style:none;margin:0;padding:0;overflow-y:auto;flex:1}
#list li{padding:5px 10px;border-bottom:1px solid #f0f0f0;cursor:pointer;display:flex;gap:8px;align-items:baseline}
#list li:hover{background:#f3f5ff}
#list li.on{background:#e3e8ff}
#list .id{color:#888;font-variant-numeric:tabular-nums;min-width:52px}
#list .lab{flex:1;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
#list .fq{color:#666;font-size:12px;font-variant-numeric:tabular-nums}
#card{flex:1;overflow-y:auto;padding:16px 24px}
#card h2{margin:0 0 4px;font-size:20px}
.stats{color:#555;margin-bottom:12px}
h3{font-size:14px;margin:18px 0 6px;color:#333;text-transform:uppercase;letter-spacing:.04em}
table{border-collapse:collapse;width:100%}
td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
th{font-weight:600;color:#555;font-size:12px}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.ctx{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12.5px;white-space:pre-wrap;word-break:break-word}
mark{background:#ffd54a;padding:0 1px;border-radius:2px}
.chip{display:inline-block;margin:2px 4px 2px 0;padding:1px 7px;border-radius:10px;background:#eef0f7;
font-family:ui-monospace,Menlo,monospace;font-size:12.5px;white-space:pre}
.hist{display:flex;align-items:flex-end;gap:2px;height:80px;border-bottom:1px solid #999;max-width:620px}
.hist div{flex:1;background:#5c6bc0;min-height:0}
.axis{display:flex;justify-content:space-between;max-width:620px;color:#777;font-size:11px}
a{color:#3949ab;text-decoration:none;cursor:pointer}
a:hover{text-decoration:underline}
.empty{color:#888;padding:30px}
"""

_SCRIPT = r"""
(function(){
"use strict";
const raw = JSON.parse(document.getElementById("atlas-data").textContent);
const table = raw.latents, bins = raw.histogram_edges.length + 1, edges = raw.histogram_edges;
function entries(name, fields, i) {
  const t = raw[name], out = [];
  for (let k = t.offsets[i]; k < t.offsets[i + 1]; k++) out.push(fields.map(f => t[f][k]));
  return out;
}
const cards = table.latent.map((latent, i) => ({
  latent, label: table.label[i], passages: table.passages[i], tokens: table.tokens[i],
  mean_activation: table.mean_activation[i], max_activation: table.max_activation[i],
  histogram: table.histogram.slice(i * bins, (i + 1) * bins),
  contexts: entries("contexts", ["passage_id", "position", "activation", "left", "token", "right"], i),
  characteristic: entries("characteristic", ["token", "fires", "count", "score"], i),
  logit_lens: entries("logit_lens", ["token"], i).map(x => x[0]),
  neighbours: entries("neighbours", ["latent", "cosine"], i),
}));
const byId = new Map(cards.map(c => [c.latent, c]));
const pct = x => (x > 0 && x < 0.001 ? (100 * x).toPrecision(2) : (100 * x).toFixed(1)) + "%";
const fq = c => c.passages / Math.max(raw.passages, 1);
const clean = t => { const s = t.trim(); return s.length ? s : (t.includes("\n") ? "\u23ce" : "\u2423"); };
const words = c => [c.label, ...c.characteristic.map(x => clean(x[0])), ...c.contexts.map(x => clean(x[4]))];
const hay = new Map(cards.map(c => [c.latent, words(c).join(" \u0001 ").toLowerCase()]));
const list = document.getElementById("list"), count = document.getElementById("count");
const input = document.getElementById("q"), sort = document.getElementById("sort");
const card = document.getElementById("card");
const LIMIT = 400;
let shown = null;
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "style") node.style.cssText = v;
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}
const ORDERS = {
  freq: (a, b) => b.tokens - a.tokens,
  rare: (a, b) => a.tokens - b.tokens,
  act: (a, b) => b.max_activation - a.max_activation,
  label: (a, b) => a.label.localeCompare(b.label),
  id: () => 0,
};
function matches() {
  const q = input.value.trim().toLowerCase();
  let found = cards;
  if (q) {
    const id = q.replace(/^#/, "");
    if (/^\d+$/.test(id)) found = cards.filter(c => String(c.latent).startsWith(id));
    else found = cards.filter(c => hay.get(c.latent).includes(q));
  }
  const order = ORDERS[sort.value] || ORDERS.id;
  return found.slice().sort((a, b) => order(a, b) || a.latent - b.latent);
}
function renderList() {
  const found = matches();
  list.textContent = "";
  for (const c of found.slice(0, LIMIT)) {
    const li = el("li", {"data-id": c.latent},
      el("span", {class: "id"}, "#" + c.latent),
      el("span", {class: "lab", title: c.label}, c.label),
      el("span", {class: "fq", title: "share of passages where it fires"}, pct(fq(c))));
    if (c.latent === shown) li.classList.add("on");
    li.addEventListener("click", () => { location.hash = "latent-" + c.latent; });
    list.append(li);
  }
  count.textContent = found.length + " of " + cards.length + " live latents" +
    (found.length > LIMIT ? " (first " + LIMIT + " listed: refine the search)" : "");
}
function link(id) {
  const other = byId.get(id);
  const a = el("a", {}, "#" + id + (other ? " " + other.label : ""));
  a.addEventListener("click", () => { location.hash = "latent-" + id; });
  return a;
}
const edgeText = b => b <= 0 ? "0" : b > edges.length ? "\u221e" : edges[b - 1].toPrecision(2);
function histogram(c) {
  const box = el("div", {class: "hist", title: "tokens per activation bin"});
  const top = Math.max(...c.histogram, 1);
  const used = c.histogram.map((x, b) => x > 0 ? b : -1).filter(b => b >= 0);
  const first = used.length ? used[0] : 0, last = used.length ? used[used.length - 1] : bins - 1;
  for (let b = first; b <= last; b++) {
    const title = c.histogram[b] + " tokens with activation in [" + edgeText(b) + ", " + edgeText(b + 1) + ")";
    box.append(el("div", {style: "height:" + (100 * c.histogram[b] / top) + "%", title}));
  }
  const axis = el("div", {class: "axis"}, el("span", {}, edgeText(first)), el("span", {}, "activation"),
    el("span", {}, edgeText(last + 1)));
  return el("div", {}, box, axis);
}
function row(cells, numeric) {
  return el("tr", {}, ...cells.map((x, i) => el("td", numeric.includes(i) ? {class: "num"} : {}, x)));
}
function renderCard(id) {
  const c = byId.get(id);
  card.textContent = "";
  shown = c ? id : null;
  for (const li of list.children) li.classList.toggle("on", Number(li.dataset.id) === shown);
  if (!c) { card.append(el("p", {class: "empty"}, "Latent #" + id + " never fires on this corpus.")); return; }
  card.append(el("h2", {}, "#" + c.latent + "  ", c.label));
  card.append(el("div", {class: "stats"}, "fires on " + c.passages + " passages (" + pct(fq(c)) + ") and " +
    c.tokens + " tokens (" + pct(c.tokens / Math.max(raw.tokens, 1)) + "); mean activation " +
    c.mean_activation + ", max " + c.max_activation));
  card.append(el("h3", {}, "Top contexts"));
  const ctx = el("table", {}, row(["passage", "activation", "context"], []));
  for (const [pid, pos, act, left, tok, right] of c.contexts) {
    const mark = el("mark", {title: "token " + pos}, tok);
    const text = el("span", {class: "ctx"}, "\u2026" + left, mark, right + "\u2026");
    ctx.append(row([pid, act, text], [1]));
  }
  card.append(ctx, el("h3", {}, "Activation histogram"), histogram(c), el("h3", {}, "Characteristic tokens"));
  const chars = el("table", {}, row(["token", "fires on", "of its occurrences", "score"], []));
  for (const [tok, fires, total, score] of c.characteristic) {
    const share = total + " (" + pct(fires / total) + ")";
    chars.append(row([el("span", {class: "chip"}, tok), fires, share, score], [1, 2, 3]));
  }
  card.append(chars, el("h3", {}, "Logit lens (tokens its decoder direction promotes)"));
  card.append(el("div", {}, ...c.logit_lens.map(t => el("span", {class: "chip"}, t))));
  card.append(el("h3", {}, "Nearest latents (decoder cosine)"));
  card.append(el("table", {}, ...c.neighbours.map(([other, cos]) => row([cos, link(other)], [0]))));
}
function route() {
  const m = /^#latent-(\d+)$/.exec(location.hash);
  if (m) renderCard(Number(m[1]));
}
input.addEventListener("input", renderList);
sort.addEventListener("change", renderList);
window.addEventListener("hashchange", route);
renderList();
if (/^#latent-\d+$/.test(location.hash)) route();
else if (cards.length) renderCard(matches()[0].latent);
})();
"""


def atlas_html(catalog: LatentCatalog, title: str | None = None) -> str:
    """The atlas of `catalog` as one HTML document (nothing is fetched when it opens)."""
    data = catalog.to_json()
    data.pop("checksum", None)
    source = catalog.source
    title = title or "Latent atlas"
    summary = (
        f"{len(catalog)} live latents of {catalog.num_latents} ({catalog.dead} never fire) on {catalog.passages} "
        f"passages, {catalog.tokens} tokens"
        + (f"; {source['llm_id']}, layer {source['layer']}" if "llm_id" in source and "layer" in source else "")
    )
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<header><h1>{html.escape(title)}</h1><p>{html.escape(summary)}</p></header>\n"
        '<main>\n<nav><div class="tools">'
        '<input id="q" type="search" placeholder="Search labels and tokens, or #id" autofocus>'
        '<select id="sort" title="order"><option value="freq">most frequent</option>'
        '<option value="rare">rarest</option><option value="act">strongest</option>'
        '<option value="id">by id</option><option value="label">by label</option></select></div>'
        '<div id="count"></div><ol id="list"></ol></nav>\n'
        '<section id="card"><p class="empty">Select a latent.</p></section>\n</main>\n'
        f'<script type="application/json" id="{ATLAS_DATA_ID}">{script_json(data)}</script>\n'
        f"<script>{_SCRIPT}</script>\n</body>\n</html>\n"
    )


def write_atlas(catalog: LatentCatalog, path: str | Path, title: str | None = None) -> Path:
    """Write the atlas of `catalog` to the HTML file `path` (atomically); returns the path."""
    path = Path(path)
    write_text_atomic(path, atlas_html(catalog, title))
    return path
