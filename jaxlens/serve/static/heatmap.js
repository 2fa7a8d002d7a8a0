// Draws one explorer view (the JSON of POST /api/view) as a table: layers by positions, the
// model's output on top and layer 0 at the bottom, each cell coloured by the statistic and
// showing its top token; hovering a cell shows its top-k tokens. Used by the page and, inlined,
// by the notebook view (jaxlens.serve.page.notebook_html). No dependencies.
(function () {
  "use strict";
  // Viridis, sampled at nine stops (matplotlib's colormap, public domain).
  const VIRIDIS = [[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
    [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]];
  const DIVERGING = [[33, 102, 172], [103, 169, 207], [209, 229, 240], [247, 247, 247],
    [253, 219, 199], [239, 138, 98], [178, 24, 43]];

  function ramp(stops, x) {
    const t = Math.min(1, Math.max(0, x)) * (stops.length - 1);
    const i = Math.min(stops.length - 2, Math.floor(t));
    const f = t - i;
    return stops[i].map((c, j) => Math.round(c + f * (stops[i + 1][j] - c)));
  }

  function position(value, scale) {
    if (scale.log) {
      const f = (v) => Math.log10(1 + Math.max(0, v));
      return (f(value) - f(scale.min)) / ((f(scale.max) - f(scale.min)) || 1);
    }
    return (value - scale.min) / ((scale.max - scale.min) || 1);
  }

  function colour(value, scale) {
    if (value === null) return [224, 224, 224];
    return ramp(scale.diverging ? DIVERGING : VIRIDIS, position(value, scale));
  }

  // How a token is written in a cell: line breaks and tabs made visible, and the spaces of a
  // token that is nothing but spaces; nothing else changed.
  function shown(token) {
    if (token === "") return "∅";
    const visible = token.replace(/\n/g, "↵").replace(/\t/g, "⇥");
    return visible.trim() === "" ? visible.replace(/ /g, "␣") : visible;
  }

  function formatted(value) {
    if (value === null) return "–";
    if (Math.abs(value) < 1e-4) return "0";
    return Math.abs(value) >= 100 ? value.toFixed(0) : value.toPrecision(3);
  }

  function percent(p) { return p >= 0.001 ? `${(100 * p).toFixed(1)}%` : "<0.1%"; }

  function tipRows(view, kind, r, c) {
    const ids = view.top_k[kind].ids[r][c], probs = view.top_k[kind].probs[r][c];
    return ids.map((id, i) => `<tr><td>${escape(shown(view.strings[id]))}</td>` +
      `<td>${percent(probs[i])}</td></tr>`).join("");
  }

  function escape(text) {
    return text.replace(/[&<>"]/g, (ch) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[ch]);
  }

  function render(container, view) {
    container.innerHTML = "";
    container.classList.add("jaxlens-heatmap");
    const title = document.createElement("div");
    title.className = "title";
    title.textContent = `${view.title} [${view.units}] — ${view.lens} lens on ${view.model}`;
    container.appendChild(title);
    const scroll = document.createElement("div");
    scroll.className = "scroll";
    const table = document.createElement("table");
    const rows = view.layer_names.length;
    for (let r = rows - 1; r >= 0; r--) {  // the output row on top
      const tr = document.createElement("tr");
      const th = document.createElement("th");
      th.className = "layer";
      th.textContent = view.layer_names[r];
      tr.appendChild(th);
      view.values[r].forEach((value, c) => {
        const td = document.createElement("td");
        const rgb = colour(value, view.scale);
        td.className = "cell";
        td.dataset.row = view.layer_names[r];
        td.dataset.col = String(c);
        td.dataset.value = value === null ? "" : String(value);
        td.style.background = `rgb(${rgb.join(",")})`;
        const light = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140;
        td.style.color = light ? "#000" : "#fff";
        td.textContent = shown(view.top_tokens[r][c]);
        td.addEventListener("mouseenter", (event) => showTip(event, view, r, c));
        td.addEventListener("mouseleave", hideTip);
        tr.appendChild(td);
      });
      table.appendChild(tr);
    }
    const inputs = document.createElement("tr");
    inputs.appendChild(document.createElement("th"));
    view.tokens.forEach((token) => {
      const td = document.createElement("td");
      td.className = "input";
      td.textContent = shown(token);
      inputs.appendChild(td);
    });
    table.appendChild(inputs);
    scroll.appendChild(table);
    container.appendChild(scroll);
    container.appendChild(legend(view));
  }

  function legend(view) {
    const box = document.createElement("div");
    box.className = "legend";
    const bar = document.createElement("div");
    bar.className = "bar";
    const stops = [];
    for (let i = 0; i <= 10; i++) stops.push(`rgb(${ramp(view.scale.diverging ? DIVERGING : VIRIDIS, i / 10).join(",")})`);
    bar.style.background = `linear-gradient(to right, ${stops.join(",")})`;
    const low = document.createElement("span"), high = document.createElement("span");
    const ends = (v) => (Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) < 1e-4 ? "0" : v.toPrecision(4));
    low.textContent = ends(view.scale.min);
    high.textContent = `${ends(view.scale.max)} ${view.units}${view.scale.log ? " (log scale)" : ""}`;
    box.append(low, bar, high);
    return box;
  }

  let tip = null;
  function showTip(event, view, r, c) {
    if (!tip) {
      tip = document.createElement("div");
      tip.className = "jaxlens-tip";
      document.body.appendChild(tip);
    }
    const kinds = Object.keys(view.top_k);
    const row = view.layer_names[r] === "output" ? "output" : `layer ${view.layer_names[r]}`;
    tip.innerHTML = `<div class="head">${escape(row)} · position ${c} “${escape(shown(view.tokens[c]))}”` +
      ` · ${formatted(view.values[r][c])} ${escape(view.units)}</div>` +
      kinds.map((kind) => (kinds.length > 1 ? `<div>${kind} lens</div>` : "") +
        `<table>${tipRows(view, kind, r, c)}</table>`).join("");
    tip.style.display = "block";
    const x = Math.min(event.clientX + 12, window.innerWidth - tip.offsetWidth - 8);
    const y = Math.min(event.clientY + 12, window.innerHeight - tip.offsetHeight - 8);
    tip.style.left = `${x}px`;
    tip.style.top = `${y}px`;
  }
  function hideTip() { if (tip) tip.style.display = "none"; }

  window.jaxlensHeatmap = { render, shown };
})();
