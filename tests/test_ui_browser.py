"""The app in a real browser (Playwright driving Debian's chromium, headless): train a content and a style from
world concepts, make, generate, and a bad upload answered in the page; nothing is fetched from another host.
Screenshots go to the test's folder (``B4M_UI_SCREENSHOTS=docs/figures`` writes the README's there).

Fails, never skips, when the browser is missing: .ci/run installs chromium."""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

from b4m.ui.app import build_app, local_theme

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(page, what, check, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"waited {timeout:.0f} s for {what}"
        page.wait_for_timeout(250)


def _runs(page) -> str:
    return page.get_by_label("Runs").input_value()


def _pick(page, label: str, value: str) -> None:
    page.get_by_role("combobox", name=label).click()
    page.get_by_role("option", name=value, exact=True).click()
    _wait_for(page, f"{label} = {value}", lambda: page.get_by_role("combobox", name=label).input_value() == value, 10)


def test_the_whole_flow_in_a_browser(tmp_path):
    assert CHROMIUM, "chromium is not installed (apt-get install chromium; .ci/run does)"
    from playwright.sync_api import sync_playwright

    shots = Path(os.environ.get("B4M_UI_SCREENSHOTS") or tmp_path)
    port = _port()
    app = build_app(tmp_path / "ws")
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, theme=local_theme())
    hosts: set[str] = set()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            page.on("request", lambda r: hosts.add(r.url.split("/")[2]))
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("text=Train a", timeout=60_000)

            # a file that is not an image: one line in the page, nothing trained
            bad = tmp_path / "notes.png"
            bad.write_text("not an image")
            page.get_by_label("Name (a folder name").fill("bad")
            page.locator("input[type=file][accept='image/*']").set_input_files(str(bad))
            page.get_by_role("button", name="Train").click()
            page.get_by_text("notes.png: not an image").first.wait_for(timeout=30_000)
            page.reload()
            page.wait_for_selector("text=Train a", timeout=60_000)

            for role, name, caption in (("content", "teapot", ""), ("style", "brick", "a diamond in zwx style")):
                page.get_by_label(role, exact=True).check()
                page.get_by_label("Name (a folder name").fill(name)
                _pick(page, "…or a world concept", name)
                # each reference's caption, shown (editable) before the run: the world's, with the placeholder
                words = "in plain style" if role == "content" else "in zwx style"
                page.locator(f"text={words} >> visible=true").first.wait_for(timeout=30_000)
                page.get_by_label("Caption (with the placeholder").fill(caption)
                page.get_by_label("Steps (empty").fill("2")
                page.get_by_role("button", name="Train").click()
                _wait_for(page, f"{role} {name}", lambda r=role, n=name: f"{r} {n}: done" in _runs(page))
            page.screenshot(path=str(shots / "app-concepts.png"), full_page=True)

            page.get_by_role("tab", name="Library").click()
            _wait_for(page, "the library", lambda: page.get_by_text("brick").count() > 0, 30)
            _pick(page, "Content", "teapot")
            _pick(page, "Style", "brick")
            page.get_by_label("Make steps").fill("1")
            page.get_by_role("button", name="Make").click()
            _wait_for(page, "make", lambda: "make teapot × brick: done" in _runs(page))

            page.get_by_role("tab", name="Generate").click()
            page.wait_for_timeout(1000)  # the tab's select event refreshes the lists
            _pick(page, "Made pair", "teapot+brick")
            page.get_by_label("Images", exact=True).fill("2")
            page.get_by_role("button", name="Generate").click()
            gallery = page.locator("img[src*='_seed']")
            _wait_for(page, "the images", lambda: gallery.count() >= 2, 120)
            _wait_for(page, "the LoRA files", lambda: page.get_by_text("fused_lora_diffusers").count() > 0, 30)
            page.screenshot(path=str(shots / "app-generate.png"), full_page=True)
            browser.close()
    finally:
        app.close()
    assert hosts == {f"127.0.0.1:{port}"}  # no analytics, fonts or anything else from another host
    assert (tmp_path / "ws" / "pairs" / "teapot+brick" / "fused.b4m.safetensors").is_file()
    assert not (tmp_path / "ws" / "content" / "bad").exists()
