"""The studio page with storyboard panels, in a real browser (Debian's Chromium, driven by Playwright)
against the app on loopback: a panel dropped on a shot makes an I2V take starting from it, a second shot
continues the first, the contact sheet shows the panel beside its takes and the chain, and a refused panel
is said in words. The take is finished by hand here (tests/test_keyframes_api.py and test_continuity.py
cover the run); a dropped panel's take rendered by the session cluster and shown finished on the contact
sheet is test_studio_panels_live.py."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, expect

from serve.jobs.keyframes import fit_to_size, load_keyframes
from serve.jobs.request import I2V_MODEL
from tests.support.api_app import LocalApi, http_server, local_api
from tests.test_editorial_api import finish_with_clip
from tests.test_images import encoded
from tests.test_studio_page import browser

__all__ = ["browser"]  # the fixture, shared with test_studio_page


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[LocalApi, str]]:
    with local_api(tmp_path, i2v={"model": "tiny-i2v"}) as api, http_server() as url:
        yield api, url


def open_signed_in(browser: Browser, api: LocalApi, url: str) -> Page:
    page = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-US").new_page()
    page.context.set_default_timeout(20_000)
    page.goto(f"{url}/studio/")
    page.get_by_label("API key").fill(api.admin_key)
    page.get_by_role("button", name="Sign in", exact=True).click()
    page.get_by_role("link", name="New storyboard").first.click()
    return page


def drop_file(page: Page, target: str, name: str, mime: str, data: bytes) -> None:
    """A file dropped on `target` as a person drags it from their desktop (a DataTransfer with the file)."""
    page.evaluate(
        """([selector, name, mime, encoded]) => {
            const bytes = Uint8Array.from(atob(encoded), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: mime }));
            const zone = document.querySelector(selector);
            for (const kind of ["dragover", "drop"]) {
                const options = { dataTransfer: transfer, bubbles: true, cancelable: true };
                zone.dispatchEvent(new DragEvent(kind, options));
            }
        }""",
        [target, name, mime, base64.b64encode(data).decode()],
    )


def test_a_panel_dropped_on_a_shot_makes_an_i2v_take_shown_beside_its_takes(browser: Browser, served) -> None:  # noqa: ANN001
    api, url = served
    panel = Image.new("RGB", (320, 180), (30, 50, 80))
    panel.paste((240, 200, 60), (100, 40, 180, 120))
    page = open_signed_in(browser, api, url)
    try:
        shots = page.locator("li.shot")
        shots.first.get_by_label("Free prompt").fill("the hero leaps out of the fireball, slow motion")
        drop_file(page, "li.shot .panel", "panel.png", "image/png", encoded(panel))
        expect(shots.first.get_by_role("img", name="Panel of shot 1")).to_be_visible()
        page.get_by_role("button", name="Add a shot").click()
        shots.nth(1).get_by_label("Free prompt").fill("she lands on the next roof")
        shots.nth(1).get_by_label("Continue from the previous shot").check()
        for field, value in (("Resolution", "96x64"), ("Duration (s)", "0.5"), ("Steps", "4")):
            page.get_by_label(field, exact=True).first.fill(value)
        page.get_by_role("button", name="Create storyboard").click()
        page.wait_for_url("**/#/boards/*")
        board_id = page.url.rsplit("/", 1)[1]
        jobs = {job.request.storyboard.shot: job for job in api.store.list(storyboard_id=board_id, limit=10)}
        assert jobs[0].request.model == I2V_MODEL and jobs[0].request.keyframes.first.kind == "image"
        stored, _ = load_keyframes(api.state.artifacts, "default", jobs[0].id)
        np.testing.assert_array_equal(stored, np.asarray(fit_to_size(panel, 96, 64)))
        assert jobs[1].continues_shot == 0

        finish_with_clip(api, jobs[0].id, 60)  # the I2V take finished (its run: test_continuity.py)
        rows = page.locator("section.shot-row")
        expect(rows.first.locator("img.shot-panel")).to_be_visible(timeout=20_000)
        expect(rows.first.locator("article.take .status").first).to_contain_text("Done", timeout=20_000)
        expect(rows.nth(1).locator("h2 .chain")).to_contain_text("continues Shot 1")
        expect(rows.nth(1).locator("article.take .status").first).to_have_text(
            "Waits for the shot it continues"
        )
        expect(rows.first.locator("h2 .chain")).to_have_count(0)  # the first shot continues nothing
        # the same board in Chinese says the chain in Chinese
        chinese = browser.new_context(viewport={"width": 1280, "height": 900}, locale="zh-CN").new_page()
        chinese.context.set_default_timeout(20_000)
        chinese.goto(f"{url}/studio/")
        chinese.get_by_label("API 密钥").fill(api.admin_key)
        chinese.get_by_role("button", name="登录", exact=True).click()
        expect(chinese.get_by_role("heading", name="项目 default")).to_be_visible()  # signed in
        chinese.goto(f"{url}/studio/#/boards/{board_id}")
        chained_row = chinese.locator("section.shot-row").nth(1)
        expect(chained_row.locator("h2 .chain")).to_contain_text("接续 镜头 1")
        expect(chained_row.locator("article.take .status").first).to_have_text("等待它所接续的镜头")
        chinese.context.close()
    finally:
        page.context.close()


def test_a_refused_panel_is_said_in_words_and_nothing_is_created(browser: Browser, served) -> None:  # noqa: ANN001
    api, url = served
    page = open_signed_in(browser, api, url)
    try:
        drop_file(page, "li.shot .panel", "notes.txt", "text/plain", b"not a picture")
        expect(page.locator("li.shot .panel .error")).to_have_text(
            "notes.txt is not a PNG, JPEG or WebP picture."
        )
        frames = [Image.new("RGB", (32, 32), colour) for colour in ((10, 10, 10), (90, 90, 90))]
        animated = encoded(frames[0], "PNG", save_all=True, append_images=frames[1:])
        drop_file(page, "li.shot .panel", "moving.png", "image/png", animated)
        page.locator("li.shot").first.get_by_label("Free prompt").fill("a panel that moves")
        page.get_by_role("button", name="Create storyboard").click()
        expect(page.locator("li.shot .panel .field-error")).to_contain_text("animated")
        assert api.store.list(limit=10) == []
    finally:
        page.context.close()
