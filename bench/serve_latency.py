"""`python -m bench.serve_latency`: how fast the lens explorer answers, on the embedded default.

    .venv/bin/python -m bench.serve_latency                      # about 4 min on a 2-core CPU
    .venv/bin/python -m bench.serve_latency --dtypes bfloat16 --repeats 5
    .venv/bin/python -m bench.serve_latency --screenshot docs/explorer.png

For each unembedding dtype, starts `python -m jaxlens.serve` (SmolLM2, the logit lens, port 0)
as a user would and measures over HTTP on 127.0.0.1:
  - cold start: from launching the process to the first page's view (the page's default text:
    the server computes it before it starts listening, so this includes loading the model and
    compiling the first bucket), with the time until it listens;
  - for texts of 16, 64 and 256 tokens: the first text of that length (it compiles the bucket),
    then `--repeats` new texts of that length (cache misses, no compilation): the page latency,
    request to parsed JSON.
The 1-minute load average is printed with each result: the machine is shared, and the times
scale with what else runs. Results go to `bench/results/serve_latency.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time
import urllib.request

from bench.children import machine

ROOT = pathlib.Path(__file__).resolve().parents[1]
LENGTHS = (16, 64, 256)


def _texts(num_tokens: int, count: int) -> list[str]:
    """`count` different Shakespeare passages of exactly `num_tokens` SmolLM2 tokens."""
    from jaxlens import assets
    from jaxlens.models.gguf import load_gguf_tokenizer

    tokenizer = load_gguf_tokenizer(assets.smollm2_gguf_path())
    words = assets.shakespeare_texts()[0].split()[2000:]
    texts, start = [], 0
    while len(texts) < count:
        text, end = "", start
        while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < num_tokens:
            text, end = " ".join(words[start : end + 1]), end + 1
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:num_tokens]
        text = tokenizer.decode(ids)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) == num_tokens:
            texts.append(text)
        start = end
    return texts


def _post(url: str, body: dict) -> tuple[float, dict]:
    request = urllib.request.Request(
        url + "api/view", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        view = json.load(response)
    return time.perf_counter() - start, view


def _start(dtype: str):
    launched = time.perf_counter()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jaxlens.serve",
            "--port=0",
            "--lens=logit",
            f"--unembed_dtype={dtype}",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    for line in process.stdout:
        if line.startswith("Serving the explorer at "):
            return process, line.split()[4], launched, time.perf_counter() - launched
    raise SystemExit(f"the server did not start (status {process.wait()})")


def measure(dtype: str, repeats: int, screenshot: pathlib.Path | None) -> dict:
    texts = {n: _texts(n, repeats + 1) for n in LENGTHS}
    process, url, launched, listening_s = _start(dtype)
    try:
        with urllib.request.urlopen(url + "api/info", timeout=60) as response:
            default_text = json.load(response)["default_text"]
        _post(url, {"text": default_text})
        result = {
            "dtype": dtype,
            "listening_s": listening_s,
            "first_page_s": time.perf_counter() - launched,
            "load_1min": os.getloadavg()[0],
            "lengths": {},
        }
        print(
            f"{dtype}: cold start to first page {result['first_page_s']:.1f} s "
            f"(listening after {listening_s:.1f} s), load {result['load_1min']:.1f}",
            flush=True,
        )
        for n in LENGTHS:
            first_s, _ = _post(url, {"text": texts[n][0]})
            times = [_post(url, {"text": t})[0] for t in texts[n][1:]]
            result["lengths"][n] = {
                "first_s": first_s,
                "times_s": times,
                "load_1min": os.getloadavg()[0],
            }
            median_ms, low_ms, high_ms = (
                1000 * x for x in (sorted(times)[len(times) // 2], min(times), max(times))
            )
            result["lengths"][n]["median_s"] = median_ms / 1000
            print(
                f"{dtype}: {n:4d} tokens: {median_ms:6.0f} ms median of {repeats} "
                f"[{low_ms:.0f}-{high_ms:.0f}] (first at this length, compiling: {first_s:.1f} s), "
                f"load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
        if screenshot is not None:
            _screenshot(url, screenshot)
        return result
    finally:
        process.terminate()
        process.wait(timeout=60)


def _screenshot(url: str, out: pathlib.Path) -> None:
    """The page for the README: Chromium types a text and keeps the drawn heat map."""
    sys.path.insert(0, str(ROOT / "tests"))  # the browser set-up the tests use
    import tempfile

    import chromium
    from selenium.webdriver.support.ui import WebDriverWait

    with tempfile.TemporaryDirectory() as profile:
        driver = chromium.start(profile, width=1500, height=1060)
        try:
            driver.get(url)
            state = lambda d: d.find_element("tag name", "body").get_attribute("data-state")  # noqa: E731
            WebDriverWait(driver, 60).until(lambda d: state(d) == "ready")
            box = driver.find_element("id", "text")
            box.clear()
            box.send_keys("The capital of France is Paris, and the capital of Italy is")
            driver.find_element("id", "show").click()
            WebDriverWait(driver, 120).until(lambda d: state(d) == "shown")
            out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(out))
        finally:
            driver.quit()
    print(f"Wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--screenshot", type=pathlib.Path, default=None)
    parser.add_argument(
        "--out", type=pathlib.Path, default=ROOT / "bench/results/serve_latency.json"
    )
    args = parser.parse_args()
    results = [
        measure(dtype, args.repeats, args.screenshot if i == 0 else None)
        for i, dtype in enumerate(args.dtypes)
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "runs": results}, indent=1))
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
