"""Every screen of the studio page in English and in Chinese (issue 28), in Debian's Chromium driven by
Playwright, against the app on loopback with takes finished by hand with real clips (no Ray: the browser
tests of the live path are test_studio_page.py and test_studio_director.py).

The page in `zh-CN` shows no string of the English catalogue on any screen; the board names takes by their
stored number, keeps its cut after a reload and lists the takes it used, with a plain mp4 download; home
plays and downloads a clip made through the API; the composer sends each shot its own settings and offers
the project's LUTs; a take waiting in a stage says where, with its ETA or that nothing is measured, then its
progress. Screenshots at 1280×800 and 390 px of every screen go to test-artifacts/studio/ as
screens-<screen>-<language>-<width>.png (board-waiting-en: a take waiting in the composing pass)."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
from axe_playwright_python.sync_playwright import Axe
from playwright.sync_api import Browser, Page, expect

from serve.jobs import JobStatus
from serve.jobs.models import utcnow
from tests.support.api_app import TINY, LocalApi, http_server, local_api
from tests.support.cuts import run_cuts
from tests.test_editorial_api import cut_of, finish_with_clip, warm_cube
from tests.test_prompt import ENGLISH_GLUE
from tests.test_studio_i18n import english_chunks
from tests.test_studio_page import browser

__all__ = ["browser"]  # the fixture, shared with test_studio_page
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "studio"
WIDTHS = {"desktop": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 844}}
BOARD = {
    "title": "Rooftops",
    "priority": "interactive",
    "quality": "draft",
    "shots": [
        {
            "name": "1A",
            "shot": {"人物": "穿黑色风衣的男人", "动作": "从塔顶跃下", "镜头": "低角度慢动作"},
            **TINY,
        },
        {"name": "1B", "shot": {"人物": "她", "动作": "落在隔壁的屋顶上，翻滚起身"}, **TINY},
    ],
    "variants": {"seeds": 2},
}


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[LocalApi, str, dict]]:
    """The app on loopback with a board: 1A takes 1–2 completed, 1B take 1 completed, 1B take 2 queued;
    1A take 2 selected; a cut; and a clip made through the API alone."""
    with tempfile.TemporaryDirectory() as scratch, local_api(Path(scratch)) as api, http_server() as url:
        board = api.client.post("/v1/storyboards", json=BOARD).json()
        ids = [[video["video_id"] for video in shot["videos"]] for shot in board["shots"]]
        for shade, video_id in enumerate([*ids[0], ids[1][0]]):
            finish_with_clip(api, video_id, 40 + 20 * shade)
        api.client.patch(f"/v1/storyboards/{board['id']}", json={"takes": {"0": ids[0][1], "1": ids[1][0]}})
        with ThreadPoolExecutor(1) as thread:  # the browser fixture's Playwright holds this thread's loop
            thread.submit(cut_of, api, board["id"], {"fps": 24}).result()
        loose = api.client.post("/v1/videos", json={"prompt": "a harbour at dawn", **TINY}).json()
        finish_with_clip(api, loose["id"], 120)
        yield api, url, {"board": board, "ids": ids, "loose": loose["id"]}


def open_page(browser: Browser, url: str, api: LocalApi, locale: str) -> Page:
    context = browser.new_context(viewport=WIDTHS["desktop"], locale=locale)
    context.set_default_timeout(20_000)
    page = context.new_page()
    page.goto(f"{url}/studio/")
    return page


def sign_in(page: Page, api: LocalApi, label: str, button: str) -> None:
    page.get_by_label(label).fill(api.admin_key)
    page.get_by_role("button", name=button, exact=True).click()


def shoot(page: Page, screen: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for width, size in WIDTHS.items():
        page.set_viewport_size(size)
        page.screenshot(path=ARTIFACTS / f"screens-{screen}-{width}.png", full_page=True)
        overflow = page.evaluate("document.documentElement.scrollWidth")
        assert overflow <= size["width"], f"{screen} is {overflow} px wide at {size['width']} px"
    page.set_viewport_size(WIDTHS["desktop"])


def assert_accessible(page: Page, screen: str) -> None:
    violations = Axe().run(page).response["violations"]
    bad = [
        f"{v['id']} ({v['impact']}): {v['help']}"
        for v in violations
        if v["impact"] in {"critical", "serious"}
    ]
    assert not bad, f"{screen}: {bad}"


def english_left(page: Page) -> list[str]:
    """The English catalogue's strings that the page shows (text, aria-labels, titles, placeholders)."""
    shown = page.evaluate(
        """() => [document.body.innerText,
            ...[...document.querySelectorAll('[aria-label]')].map((e) => e.getAttribute('aria-label')),
            ...[...document.querySelectorAll('[title]')].map((e) => e.getAttribute('title')),
            ...[...document.querySelectorAll('[placeholder]')].map((e) => e.getAttribute('placeholder')),
            ...[...document.querySelectorAll('option')].map((e) => e.textContent)].join('\\n')"""
    )
    shown = shown.replace("a harbour at dawn", "")  # a clip's own English prompt is the director's text
    return [chunk for chunk in english_chunks() if re.search(rf"\b{re.escape(chunk)}\b", shown)]


def test_every_screen_in_chinese_has_no_untranslated_string(browser: Browser, served) -> None:  # noqa: ANN001
    api, url, made = served
    page = open_page(browser, url, api, "zh-CN")
    try:
        assert page.evaluate("document.documentElement.lang") == "zh-CN"
        expect(page.get_by_role("heading", name="登录 Previz")).to_be_visible()
        assert english_left(page) == []
        shoot(page, "sign-in-zh")
        sign_in(page, api, "API 密钥", "登录")
        expect(page.get_by_role("heading", name="项目 default")).to_be_visible()
        expect(page.get_by_role("list", name="最近的视频").locator("video").first).to_be_visible()
        assert english_left(page) == [], "home"
        assert_accessible(page, "home in Chinese")
        shoot(page, "home-zh")
        page.get_by_role("link", name="新建故事板").first.click()
        expect(page.get_by_role("heading", name="新建故事板")).to_be_visible()
        page.locator("details.own-settings").first.evaluate("(details) => { details.open = true; }")
        assert english_left(page) == [], "composer"
        assert_accessible(page, "composer in Chinese")
        shoot(page, "composer-zh")
        page.goto(f"{url}/studio/#/boards/{made['board']['id']}")
        expect(page.locator("article.take")).to_have_count(4)
        expect(page.locator("article.take .take-name").first).to_have_text("1A 第 1 条")
        expect(page.get_by_role("region", name="初剪").get_by_role("heading", level=2)).to_contain_text(
            "初剪"
        )
        assert english_left(page) == [], "board"
        assert_accessible(page, "board in Chinese")
        shoot(page, "board-zh")
    finally:
        page.context.close()


def test_the_board_names_takes_keeps_its_cut_and_home_plays_any_clip(browser: Browser, served) -> None:  # noqa: ANN001
    api, url, made = served
    page = open_page(browser, url, api, "en-US")
    try:
        shoot(page, "sign-in-en")
        sign_in(page, api, "API key", "Sign in")
        home = page.get_by_role("list", name="Recent videos").get_by_role("listitem")
        loose = home.filter(has_text="a harbour at dawn")
        expect(loose.locator("video")).to_have_attribute("src", re.compile(r"^/v1/artifacts/.*\.mp4\?"))
        expect(loose.get_by_role("link", name="Download mp4")).to_have_attribute(
            "download", f"{made['loose']}.mp4"
        )
        assert loose.locator("video").get_attribute("controls") is None  # controls only on hover/focus
        loose.locator("video").hover()
        expect(loose.locator("video")).to_have_attribute("controls", "")
        shoot(page, "home-en")
        page.get_by_role("link", name="New storyboard").first.click()
        shoot(page, "composer-en")

        page.goto(f"{url}/studio/#/boards/{made['board']['id']}")
        rows = page.locator("section.shot-row")
        expect(rows.first.locator(".take-name")).to_have_text(["1A take 1", "1A take 2"])
        # the Chinese shot's compiled prompt, on demand: Chinese connectives, no English glue words
        compiled = rows.first.locator("details.compiled .prompt").text_content()
        assert compiled == "穿黑色风衣的男人从塔顶跃下。镜头：低角度慢动作。"
        assert not ENGLISH_GLUE.search(compiled)
        # at 1280 px the contact sheet uses the width: a shot's two takes fill its row, posters a usable size
        sheet = rows.first.locator(".takes").bounding_box()
        cards = [card.bounding_box() for card in rows.first.locator("article.take").all()]
        assert sum(card["width"] for card in cards) >= 0.9 * sheet["width"], (sheet, cards)
        assert all(card["width"] >= 300 for card in cards), cards
        expect(rows.first.locator("h2")).to_have_text(
            "1A 穿黑色风衣的男人从塔顶跃下"
        )  # name and a short description
        # queued: its place, and an ETA priced with the run times of the takes finished before it
        expect(rows.nth(1).locator("article.take").nth(1).locator(".status")).to_have_text(
            re.compile(r"^Next in the studio queue · about \d+ s left$")
        )
        expect(page.locator(".summary")).to_have_text("2 shots · 4 takes · rendering · 75 %")
        # both shots have a selected completed take: the cut can be rendered; 1A take 2 can be promoted
        expect(page.get_by_role("button", name="Render first cut")).to_be_enabled()
        expect(page.get_by_role("button", name="Promote selected takes")).to_be_enabled()
        download = rows.first.locator("article.take").nth(1).get_by_role("link", name="Download mp4")
        expect(download).to_have_attribute("download", "01-1A-take2.mp4")  # as the CLI names the file

        cut = page.get_by_role("region", name="First cut")
        expect(cut.get_by_role("heading", level=2)).to_contain_text("First cut · 2 clips")
        used = cut.get_by_role("list", name="Takes in this cut").get_by_role("listitem")
        expect(used).to_have_text(["1A take 2", "1B take 1"])
        expect(cut.get_by_role("link", name="Download mp4")).to_have_attribute(
            "download", re.compile(r"\.mp4$")
        )
        assert_accessible(page, "board")
        shoot(page, "board-en")
        page.reload()
        expect(cut.get_by_role("list", name="Takes in this cut").get_by_role("listitem")).to_have_text(
            ["1A take 2", "1B take 1"]
        )
        # deselect 1B: its second take still renders, so the cut waits for it, and says so
        api.client.patch(f"/v1/storyboards/{made['board']['id']}", json={"takes": {"1": None}})
        page.reload()
        expect(page.get_by_role("button", name="Render first cut")).to_be_disabled()
        expect(page.locator("#toolbar-reason")).to_contain_text("The first cut waits for 1B")
        api.client.patch(f"/v1/storyboards/{made['board']['id']}", json={"takes": {"1": made["ids"][1][0]}})
    finally:
        page.context.close()


def test_the_board_follows_a_cut_as_it_renders_and_can_cancel_it(browser: Browser, served) -> None:  # noqa: ANN001
    """The page asks for the cut (202), shows it queued, then its progress as the store records it, and
    its cancel; a cut asked for again renders to the player."""
    api, url, made = served
    board_id = made["board"]["id"]
    page = open_page(browser, url, api, "en-US")
    try:
        sign_in(page, api, "API key", "Sign in")
        # the sign-in routes to home when it lands: open the board after that, not before
        expect(page.get_by_role("heading", name="Project default")).to_be_visible()
        page.goto(f"{url}/studio/#/boards/{board_id}")
        region = page.get_by_role("region", name="First cut")
        expect(region.get_by_role("heading", level=2)).to_contain_text("First cut · 2 clips")
        page.get_by_role("button", name="Render first cut").click()
        expect(region.get_by_role("status")).to_have_text("The first cut is queued…")
        expect(page.get_by_role("button", name="Render first cut")).to_be_disabled()
        queued = api.store.latest_cut(board_id)
        running = api.store.claim_cut(queued.id, "test-scheduler")  # as the Scheduler would, half-way
        assert api.store.advance_cut(queued.id, running.attempt, progress=0.5, eta_at=None)
        expect(region.get_by_role("status")).to_contain_text(
            "Rendering the first cut of the selected takes · 50 %"
        )
        expect(region.get_by_role("progressbar", name="Progress of the first cut")).to_have_attribute(
            "value", "50"
        )
        region.get_by_role("button", name="Cancel the cut").click()
        expect(region.get_by_role("alert")).to_have_text("The cut was cancelled.")
        assert api.store.get_cut(queued.id).status == "cancelled"

        page.get_by_role("button", name="Render first cut").click()
        expect(region.get_by_role("status")).to_contain_text("The first cut is queued…")
        with ThreadPoolExecutor(1) as thread:  # Playwright holds this thread's event loop
            thread.submit(run_cuts, api).result()
        expect(region.get_by_role("heading", level=2)).to_contain_text("First cut · 2 clips")
        expect(region.locator("video")).to_have_attribute("src", re.compile(r"/v1/artifacts/.*\.mp4"))
    finally:
        page.context.close()


def test_a_take_card_sets_its_review_and_adds_a_note_at_a_frame(browser: Browser, served) -> None:  # noqa: ANN001
    api, url, made = served
    page = open_page(browser, url, api, "en-US")
    try:
        sign_in(page, api, "API key", "Sign in")
        expect(page.get_by_role("list", name="Recent videos")).to_be_visible()  # signed in: home shows
        page.goto(f"{url}/studio/#/boards/{made['board']['id']}")
        card = page.locator("section.shot-row").first.locator("article.take").first
        status = card.get_by_label("Review status")
        expect(status).to_have_value("pending")
        status.select_option("needs-changes")
        expect(card).to_have_attribute("data-review", "needs-changes")
        video_id = made["ids"][0][0]
        assert api.store.get(video_id).review == "needs-changes"
        card.get_by_role("button", name="Notes").click()
        card.get_by_label("New note").fill("the door opens too early")
        card.get_by_label("Frame (optional)").fill("4")
        card.get_by_role("button", name="Add note").click()
        expect(card.get_by_role("list", name="Review notes").get_by_role("listitem")).to_have_text(
            [re.compile(r"^frame 4 · .+: the door opens too early$")]
        )
        notes = api.client.get(f"/v1/videos/{video_id}/notes").json()["data"]
        assert [(note["text"], note["frame"]) for note in notes] == [("the door opens too early", 4)]
        card.get_by_label("Frame (optional)").fill("99")  # past the take's last frame: the server's words
        card.get_by_label("New note").fill("too late")
        card.get_by_role("button", name="Add note").click()
        expect(card.locator(".review-box .error")).to_contain_text("not frame 99")  # English: its sentence
        page.reload()
        expect(
            page.locator("section.shot-row").first.locator("article.take").first.get_by_label("Review status")
        ).to_have_value("needs-changes")
        assert_accessible(page, "board with review")
    finally:
        api.client.put(f"/v1/videos/{made['ids'][0][0]}/review", json={"status": "pending"})
        page.context.close()


def test_the_composer_sends_each_shot_its_own_settings_and_offers_the_projects_luts(
    browser: Browser,
    served,  # noqa: ANN001
) -> None:
    """Per-shot size, length, quality, look (a LUT of the project, offered in the look field) and seed;
    the board's settings for the other shot; a long Chinese description kept whole in a multi-line field."""
    api, url, _made = served
    lut = api.client.put("/v1/admin/projects/default/luts/warm", json={"cube": warm_cube()})
    assert lut.status_code == 201
    page = open_page(browser, url, api, "en-US")
    try:
        sign_in(page, api, "API key", "Sign in")
        expect(page.get_by_role("heading", name="Project default")).to_be_visible()
        page.get_by_role("link", name="New storyboard").first.click()
        offered = page.locator("datalist#looks option[value=warm]")  # the project's LUT, in the look field
        expect(offered).to_have_attribute("label", re.compile("warm"))
        page.get_by_label("Title").fill("Per-shot settings")
        long_action = "从塔顶跃下，\n风衣在风中展开，\n落在隔壁的屋顶上翻滚起身，回头望向追来的无人机"
        first = page.locator("li.shot").nth(0)
        action = first.get_by_label("Action · 动作")
        assert action.evaluate("(field) => field.tagName") == "TEXTAREA"
        action.fill(long_action)
        page.get_by_role("button", name="Add a shot").click()
        second = page.locator("li.shot").nth(1)
        second.get_by_label("Free prompt").fill("a harbour at dawn, wide")
        second.locator("details.own-settings summary").click()
        second.get_by_label("Size of this shot").fill("64x96")
        second.get_by_label("Length of this shot (s)").fill("0.25")
        second.get_by_label("Draft or final (this shot)").select_option("final")
        second.get_by_label("Look of this shot").fill("warm")
        second.get_by_label("Seed of this shot").fill("7")
        page.get_by_label("Resolution").fill("96x64")
        page.get_by_label("Duration (s)").fill("0.5")
        page.get_by_label("Quality").select_option("draft")
        page.get_by_label("Steps").fill("4")
        page.get_by_role("button", name="Create storyboard").click()
        expect(page.locator("section.shot-row")).to_have_count(2)
        board = next(
            b for b in api.client.get("/v1/storyboards").json()["data"] if b["title"] == "Per-shot settings"
        )
        shots = api.client.get(f"/v1/storyboards/{board['id']}").json()["shots"]
        videos = [api.client.get(f"/v1/videos/{shot['videos'][0]['video_id']}").json() for shot in shots]
        assert videos[0]["prompt"] == long_action.replace("\n", "") + "。"  # kept whole, its lines joined
        assert [(v["size"], v["seconds"], v["quality"], v["look"]) for v in videos] == [
            ("96x64", "0.5", "draft", "none"),
            ("64x96", "0.25", "final", "warm"),
        ]
        assert videos[1]["seed"] == 7
        for video in videos:  # not to be run by the next test's hand
            assert api.client.delete(f"/v1/videos/{video['id']}", params={"cancel_only": True}).is_success
    finally:
        page.context.close()


def test_a_take_waiting_in_a_stage_says_where_with_its_eta_then_shows_its_progress(
    browser: Browser,
    served,  # noqa: ANN001
) -> None:
    """1B take 2, run by hand as the Scheduler runs it: it waits in the composing pass's engine (two ahead),
    first with nothing measured there (said in words), then with the ETA the engine's queued work gives;
    then it runs and shows its progress. Last in the module: the take stays running."""
    api, url, made = served
    video_id = made["ids"][1][1]
    page = open_page(browser, url, api, "en-US")
    try:
        sign_in(page, api, "API key", "Sign in")
        expect(page.get_by_role("heading", name="Project default")).to_be_visible()
        page.goto(f"{url}/studio/#/boards/{made['board']['id']}")
        status = page.locator(f'article.take[data-video="{video_id}"] .status')
        expect(status).to_have_text(re.compile(r"^Next in the studio queue · "))
        job = api.store.claim(video_id, "test-scheduler")
        assert job is not None
        assert api.store.advance(video_id, job.attempt, JobStatus.DENOISING_HIGH, engine_queue_position=2)
        expect(status).to_have_text(
            "Waiting for the composing pass · 2 ahead · no estimate yet: nothing measured"
        )
        expect(page.locator(f'article.take[data-video="{video_id}"]')).to_have_attribute(
            "data-waiting", "denoising_high"
        )
        eta_at = utcnow() + timedelta(minutes=10)
        assert api.store.advance(
            video_id, job.attempt, JobStatus.DENOISING_HIGH, engine_queue_position=2, eta_at=eta_at
        )
        expect(status).to_have_text(
            re.compile(r"^Waiting for the composing pass · 2 ahead · about (9|10) min \d+ s left$")
        )
        shoot(page, "board-waiting-en")
        assert api.store.advance(video_id, job.attempt, JobStatus.DENOISING_HIGH, stage_progress=0.5)
        expect(status).to_have_text(re.compile(r"^Composing the shot · \d+ % · about (9|10) min \d+ s left$"))
    finally:
        page.context.close()
