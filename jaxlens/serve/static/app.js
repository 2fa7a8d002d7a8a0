// The explorer page: fills the controls from /api/info, sends the text and choices to
// /api/view, and hands the answer to jaxlensHeatmap.render. body[data-state] tells a test (or a
// reader) where it is: loading, ready, busy, shown or error.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  let pending = 0;

  function option(select, value, label) {
    const o = document.createElement("option");
    o.value = value;
    o.textContent = label;
    select.appendChild(o);
  }

  async function init() {
    const info = await (await fetch("/api/info")).json();
    $("model").textContent = `${info.model}: ${info.num_layers} layers, up to ${info.token_limit} tokens`;
    const labels = { logit: "logit lens", tuned: "tuned lens", difference: "tuned − logit" };
    info.lenses.forEach((lens) => option($("lens"), lens, labels[lens]));
    info.statistics.forEach((s) => option($("statistic"), s.name, s.title));
    for (const id of ["first", "last"]) $(id).max = String(info.num_layers - 1);
    $("last").value = String(info.num_layers - 1);
    if (!$("text").value) $("text").value = info.default_text;
    if (info.lenses.includes("tuned")) $("lens").value = "tuned";
    $("controls").addEventListener("submit", (event) => { event.preventDefault(); show(); });
    for (const id of ["lens", "statistic", "first", "last"]) $(id).addEventListener("change", show);
    document.body.dataset.state = "ready";
  }

  async function show() {
    const ticket = ++pending;  // only the latest answer is drawn
    document.body.dataset.state = "busy";
    $("status").textContent = "computing…";
    $("error").textContent = "";
    const request = {
      text: $("text").value,
      lens: $("lens").value,
      statistic: $("statistic").value,
      layers: [Number($("first").value), Number($("last").value)],
    };
    const started = performance.now();
    try {
      const response = await fetch("/api/view", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(request),
      });
      const answer = await response.json();
      if (ticket !== pending) return;
      if (!response.ok) throw new Error(answer.error);
      jaxlensHeatmap.render($("heatmap"), answer);
      const ms = performance.now() - started;
      $("status").textContent = `${answer.num_tokens} tokens, ${ms.toFixed(0)} ms`;
      document.body.dataset.state = "shown";
    } catch (error) {
      if (ticket !== pending) return;
      $("error").textContent = `error: ${error.message}`;
      $("status").textContent = "";
      document.body.dataset.state = "error";
    }
  }

  init().catch((error) => {
    $("error").textContent = `error: ${error.message}`;
    document.body.dataset.state = "error";
  });
})();
