"""The market's web page in a real browser (Debian's chromium, driven by Playwright).

One test clicks through the page as a user would: search the catalogue, pick three classes, pack,
read the result, download the ONNX file, try the pack on real CIFAR-10 test images (file input
and drag-and-drop), and see a refusal. Everything the page shows is checked against the JSON API's
answer to the same request. A screenshot is kept as an artefact (``SNP_TEST_ARTIFACTS``, else
pytest's ``tmp_path``).
"""
from __future__ import annotations

import base64
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest

log = logging.getLogger(__name__)

CLASSES = ["airplane", "cat", "ship"]     # CIFAR-10 names: the smoke market's classes
TIMEOUT_MS = 120_000                      # a pack build or an ONNX export on a loaded machine


def test_page_packs_downloads_and_predicts(browser, served_market, real_data, tmp_path):
    import httpx
    from playwright.sync_api import expect

    url, _ = served_market
    http = httpx.Client(base_url=url, timeout=TIMEOUT_MS / 1000)
    catalogue = http.get("/v1/classes").json()
    names = [c["name"] for c in catalogue["classes"]]
    ids = {c["name"]: c["id"] for c in catalogue["classes"]}
    assert set(CLASSES) <= set(names)
    k = catalogue["ks"][0]

    context = browser.new_context(accept_downloads=True, viewport={"width": 1100, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error"   # refusals: expected
            and not m.text.startswith("Failed to load resource") else None)
    try:
        page.goto(url)
        option = lambda name: page.locator(f'#class-list li[data-class="{name}"]')   # noqa: E731

        # The catalogue: every class, with its holder count and sliced k values
        expect(page.locator('[data-testid="class-option"]')).to_have_count(len(names))
        for c in catalogue["classes"]:
            n = len(c["holders"])
            expect(option(c["name"]).get_by_test_id("class-holders")).to_have_text(
                f"{n} holder{'' if n == 1 else 's'} · k {', '.join(map(str, c['ks']))}")
        expect(page.locator("#catalogue-summary")).to_contain_text(f"{len(names)} classes")
        assert page.locator("#k-select option").all_inner_texts() == [str(x) for x in catalogue["ks"]]
        assert page.locator("#plan-select option").evaluate_all("os => os.map(o => o.value)") == [
            "best", "top-2", "all"]

        # A refusal: packing nothing shows the service's own error message
        empty = {"classes": [], "k": k, "plan": "best"}
        refused = http.post("/v1/packs", json=empty)
        assert refused.status_code == 400
        page.click("#pack-button")
        expect(page.locator("#error")).to_be_visible()
        expect(page.locator("#error-message")).to_have_text(refused.json()["error"])
        expect(page.locator("#result")).to_be_hidden()

        # Search filters the list; pick three classes through it
        page.fill("#class-search", "ca")
        expect(option("cat")).to_be_visible()
        expect(option("airplane")).to_be_hidden()
        expect(page.locator("#class-list li:visible")).to_have_count(
            sum("ca" in n for n in names))
        for name in CLASSES:
            page.fill("#class-search", name)
            option(name).locator("input").check()
        page.fill("#class-search", "")
        expect(page.locator("#class-list li:visible")).to_have_count(len(names))
        expect(page.locator("#selected-count")).to_have_text(f"3 selected: {', '.join(CLASSES)}")
        page.select_option("#k-select", str(k))
        page.select_option("#plan-select", "best")

        # Pack: the page shows what the API answers for the same request
        page.click("#pack-button")
        expect(page.locator("#pack-id")).to_have_text(re.compile(r"^[0-9a-f]{24}$"))
        expect(page.locator("#error")).to_be_hidden()
        meta = http.post("/v1/packs", json={"classes": CLASSES, "k": k, "plan": "best"}).json()
        pid = meta["id"]
        expect(page.locator("#pack-id")).to_have_text(pid)
        expect(page.locator("#pack-classes")).to_have_text(", ".join(meta["classes"]))
        params = page.locator("#pack-params")
        assert params.get_attribute("data-value") == str(meta["params"])
        expect(params).to_have_text(f"{format_params(meta['params'])} parameters")
        expect(page.locator("#pack-accuracy-label")).to_have_text("Few-shot accuracy estimate")
        expect(page.locator("#pack-accuracy-note")).to_contain_text("not test accuracy")
        expect(page.locator("#pack-accuracy-note")).to_contain_text("cross-validated")
        expect(page.locator("#pack-accuracy")).to_have_text(f"{100 * meta['fewshot_accuracy']:.1f} %")
        expect(page.locator("#pack-time")).to_contain_text(f"built in {meta['build_seconds']:.1f} s")
        expect(page.locator("#pack-accuracy-samples")).to_have_text(
            f"{meta['fewshot_samples']} few-shot samples (k = {k} per class)")
        cached = page.locator("#pack-cached")
        assert cached.get_attribute("data-value") in ("true", "false")
        expect(cached).to_contain_text("yes" if cached.get_attribute("data-value") == "true" else "no")
        expect(page.locator("#pack-fragments tr")).to_have_count(len(meta["fragments"]))

        # Downloads: the ONNX file through the browser, the other links by URL
        for link, name in (("#download-safetensors", "model.safetensors"),
                           ("#download-spec", "spec.json")):
            href = page.locator(link).get_attribute("href")
            assert href == f"/v1/packs/{pid}/{name}"
            assert http.get(href).status_code == 200
        with page.expect_download(timeout=TIMEOUT_MS) as info:
            page.click("#download-onnx")
        download = info.value
        assert download.failure() is None, download.failure()
        assert download.suggested_filename == f"{pid}-model.onnx"
        onnx_path = Path(download.path())
        blob = onnx_path.read_bytes()
        assert len(blob) > 1000 and blob[0] == 0x08   # ModelProto: field 1 (ir_version), varint

        # Try it: a real CIFAR-10 test image of a packed class, by file input then by drop
        images = cifar_test_images(real_data, [ids["cat"], ids["ship"]])
        shown = upload(page, "cat.png", images[0])
        assert_same(shown, api_predictions(http, pid, images[0]))
        check_onnx(onnx_path, images[0], meta["classes"], shown)
        shown = drop(page, "ship.png", images[1])
        assert_same(shown, api_predictions(http, pid, images[1]))
        preview = page.get_by_test_id("image-preview")
        expect(preview).to_be_visible()
        assert preview.evaluate("img => img.complete && img.naturalWidth") == 32

        shot = artefacts(tmp_path) / "web.png"
        page.screenshot(path=str(shot), full_page=True)
        log.info("web page screenshot: %s", shot)
        print(f"web page screenshot: {shot}")
        assert not errors, errors
    finally:
        context.close()
        http.close()


# ---------------------------------------------------------------- helpers
def format_params(n: int) -> str:
    """The page's formatting of a parameter count (app.js ``formatParams``)."""
    if n >= 1e6:
        return f"{n / 1e6:.2f} M"
    if n >= 1e3:
        return f"{n / 1e3:.1f} k"
    return str(n)


def artefacts(tmp_path: Path) -> Path:
    root = Path(os.environ["SNP_TEST_ARTIFACTS"]) if os.environ.get("SNP_TEST_ARTIFACTS") else tmp_path
    root.mkdir(parents=True, exist_ok=True)
    return root


def cifar_test_images(data_root: Path, labels: list[int]) -> list[bytes]:
    """The first CIFAR-10 test image (PNG bytes) of each label."""
    import pyarrow.parquet as pq

    table = pq.read_table(data_root / "cifar10" / "test.parquet", columns=["image", "label"])
    found = np.asarray(table.column("label"))
    column = table.column("image")
    out = []
    for label in labels:
        value = column[int(np.flatnonzero(found == label)[0])].as_py()
        out.append(value["bytes"] if isinstance(value, dict) else value)
    return out


def shown_predictions(page) -> list[tuple[str, float]]:
    """The predictions on the page: (class, probability), top first. Each probability is read
    from the bar's data attribute, and checked against its printed percentage."""
    rows = page.get_by_test_id("prediction")
    out = []
    for i in range(rows.count()):
        row = rows.nth(i)
        p = float(row.get_attribute("data-probability"))
        printed = float(row.locator(".pred-prob").inner_text().rstrip(" %"))
        assert abs(printed - 100 * p) <= 0.05 + 1e-9, (printed, p)
        out.append((row.get_attribute("data-class"), p))
    return out


def upload(page, name: str, png: bytes) -> list[tuple[str, float]]:
    from playwright.sync_api import expect

    page.set_input_files("#image-input", files=[{"name": name, "mimeType": "image/png", "buffer": png}])
    expect(page.locator(".file-name")).to_have_text(name)
    expect(page.get_by_test_id("prediction")).not_to_have_count(0)
    return shown_predictions(page)


def drop(page, name: str, png: bytes) -> list[tuple[str, float]]:
    """Drop a file on the drop zone (a synthetic drop event carrying a DataTransfer, as a
    real drag from the desktop delivers it)."""
    from playwright.sync_api import expect

    page.get_by_test_id("drop-zone").evaluate(
        """(zone, [name, b64]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, { type: "image/png" }));
            zone.dispatchEvent(new DragEvent("dragenter", { dataTransfer: dt, bubbles: true, cancelable: true }));
            zone.dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
        }""", [name, base64.b64encode(png).decode()])
    expect(page.locator(".file-name")).to_have_text(name)
    expect(page.get_by_test_id("prediction")).not_to_have_count(0)
    return shown_predictions(page)


def api_predictions(http, pid: str, png: bytes) -> list[tuple[str, float]]:
    r = http.post(f"/v1/packs/{pid}/predict", json={"images": [base64.b64encode(png).decode()]})
    assert r.status_code == 200, r.text
    return [(p["class"], p["probability"]) for p in r.json()["predictions"][0]]


def assert_same(shown: list[tuple[str, float]], api: list[tuple[str, float]]) -> None:
    """The same classes in the same order, with the same probabilities to 3 decimals (two
    predict calls may be batched differently, which moves the last float digits)."""
    assert [c for c, _ in shown] == [c for c, _ in api], (shown, api)
    for (_, p), (_, q) in zip(shown, api):
        assert abs(p - q) < 5e-4, (shown, api)


def check_onnx(path: Path, png: bytes, head: list[str], shown: list[tuple[str, float]]) -> None:
    """The downloaded ONNX file, run on the same image, gives the probabilities the page shows."""
    try:
        import onnxruntime as ort
    except ImportError:
        log.warning("onnxruntime is missing: the downloaded ONNX file is not run")
        return
    from snp_ray.serve.images import decode_batch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: decode_batch([png], ["png"])})[0][0]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    for name, p in shown:
        assert abs(probs[head.index(name)] - p) < 1e-3, (name, probs, shown)
