"""The studio page in a real browser (Debian's Chromium, driven by Playwright) against the live session
cluster: sign in, compose a 2-shot × 2-take board, watch it render, play, remix, select, refusals in
words, an axe-core scan of each screen, and screenshots at 1280×800 and 390 px wide.

Screenshots are written to test-artifacts/studio/ (PREVIZ_TEST_ARTIFACTS overrides the folder)."""

from __future__ import annotations

import os
import re
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from axe_playwright_python.sync_playwright import Axe
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.support.cluster import REPO, Cluster

TINY = {"resolution": "96x64", "duration": 0.5, "steps": 4}

pytestmark = pytest.mark.cluster

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("PREVIZ_TEST_ARTIFACTS", REPO / "test-artifacts")) / "studio"
WIDTHS = {"desktop": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 844}}
SERIOUS = {"critical", "serious"}
TAKE_TIMEOUT_MS = 420_000  # four tiny takes through every stage on a 2-core machine
# expect()'s own bound (Playwright's default is 5 s; a context's default timeout is for actions only): a
# page that polls a busy 2-core box's API can take longer than 5 s to show what the server already did
EXPECT_TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One Chromium for this module. Module-scoped, not pytest-playwright's session-long Playwright: the
    sync API keeps an event loop on the main thread while it lives, and every later `asyncio.run()` in
    the suite (the Scheduler and webhook tests) would fail with "cannot be called from a running loop"."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: scripts/install_chromium.sh installs Debian's chromium")
    # the flags keep Chromium off the network it cannot reach (a closed studio network, CI)
    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
    flags += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=flags)
        expect.set_options(timeout=EXPECT_TIMEOUT_MS)
        try:
            yield chromium
        finally:
            expect.set_options(timeout=None)  # Playwright's default again
            chromium.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport=WIDTHS["desktop"])
    context.set_default_timeout(30_000)
    yield context.new_page()
    context.close()


def shoot(page: Page, screen: str) -> None:
    """The screen at both widths, as test artifacts."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for width, size in WIDTHS.items():
        page.set_viewport_size(size)
        page.screenshot(path=ARTIFACTS / f"{screen}-{width}.png", full_page=True)
        overflow = page.evaluate("document.documentElement.scrollWidth")
        assert overflow <= size["width"], f"{screen} is {overflow} px wide at {size['width']} px"
    page.set_viewport_size(WIDTHS["desktop"])


def assert_accessible(page: Page, screen: str) -> None:
    violations = Axe().run(page).response["violations"]
    bad = [f"{v['id']} ({v['impact']}): {v['help']}" for v in violations if v["impact"] in SERIOUS]
    assert not bad, f"{screen}: {bad}"


def sign_in(page: Page, cluster: Cluster, key: str) -> None:
    page.goto(f"{cluster.url}/studio/")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()


def test_a_wrong_key_shows_the_sign_in_error(page: Page, cluster: Cluster) -> None:
    page.goto(f"{cluster.url}/studio/")
    assert_accessible(page, "sign-in")
    shoot(page, "sign-in")
    # by keyboard alone: the key field has the focus, visibly; Enter signs in
    assert page.evaluate("document.activeElement.name") == "key"
    page.keyboard.type("pvz_000000000000_not-a-key")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Sign in"
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") == "solid"
    page.keyboard.press("Enter")
    expect(page.get_by_role("alert").filter(has_text="the API key is not valid")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0  # a refused key is not kept
    cluster.key_for("studio-page")  # the project exists
    store = cluster.store()
    record, revoked = store.create_key("studio-page", "member", "to revoke")
    store.revoke_key(record.id)
    store.close()
    sign_in(page, cluster, revoked)
    expect(page.get_by_role("alert").filter(has_text="revoked")).to_be_visible()


def compose(page: Page, shots: list[dict[str, str]], *, takes: int) -> None:
    page.get_by_role("link", name="New storyboard").first.click()
    for index, shot in enumerate(shots):
        if index:
            page.get_by_role("button", name="Add a shot").click()
        card = page.locator("li.shot").nth(index)
        for label, text in shot.items():
            card.get_by_label(label, exact=False).fill(text)
    page.get_by_label("Resolution").fill("96x64")
    page.get_by_label("Duration (s)").fill("0.5")
    page.get_by_label("Steps").fill("4")
    page.get_by_label("Takes per shot (seeds)").fill(str(takes))


def test_a_storyboard_is_composed_rendered_played_remixed_and_selected(page: Page, cluster: Cluster) -> None:
    project = "studio-page"
    sign_in(page, cluster, cluster.key_for(project))
    expect(page.get_by_role("heading", name=f"Project {project}")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('previz.apiKey')").startswith("pvz_")
    compose(
        page,
        [
            {"Character · 人物": "a man in a black trench coat", "Action · 动作": "leaps from a tower"},
            {"Free prompt": "an explosion behind a refinery, slow motion"},
        ],
        takes=2,
    )
    page.get_by_label("Quality").select_option("draft")  # a board is `batch` work: final unless asked
    preview = page.locator("li.shot").first.locator("output.preview")
    expect(preview).to_have_text("a man in a black trench coat leaps from a tower.")  # compiled by the server
    assert_accessible(page, "composer")
    shoot(page, "composer")
    page.get_by_role("button", name="Create storyboard").click()

    expect(page).to_have_url(re.compile(r"#/boards/sb_"))
    board_id = page.url.rsplit("/", 1)[1]
    takes = page.locator("article.take")
    expect(takes).to_have_count(4)
    assert page.locator("section.shot-row").count() == 2
    expect(page.locator("article.take .mark")).to_have_count(4)  # the AI-generated draft mark on each
    for index in range(4):
        expect(takes.nth(index)).to_have_attribute("data-status", "completed", timeout=TAKE_TIMEOUT_MS)
        expect(takes.nth(index).locator("progress")).to_have_count(0)  # replaced by the player at 100 %
        expect(takes.nth(index).locator("video")).to_have_attribute("poster", re.compile("."))
    expect(takes.first.locator(".status")).to_have_text("Done")
    assert_accessible(page, "contact sheet")
    shoot(page, "contact-sheet")

    video = takes.first.locator("video")
    played = video.evaluate(
        """async (video) => {
            video.muted = true;
            await video.play();
            await new Promise((resolve) => setTimeout(resolve, 300));
            return {duration: video.duration, time: video.currentTime};
        }"""
    )
    assert played["duration"] > 0 and played["time"] > 0, played

    first_row = page.locator("section.shot-row").first
    first_row.locator("article.take").first.get_by_role("button", name="Remix").click()
    page.get_by_label("Prompt of the remix").fill("a man in a blue trench coat leaps from a tower.")
    page.get_by_role("button", name="Make the remix").click()
    expect(first_row.locator("article.take")).to_have_count(3)
    expect(page.locator("section.shot-row").nth(1).locator("article.take")).to_have_count(2)

    rows = page.locator("section.shot-row")
    chosen = []
    for row_index in range(2):
        take = rows.nth(row_index).locator("article.take").nth(1)
        take.get_by_role("button", name="Select take").click()
        expect(take.get_by_role("button", name="Selected take")).to_have_attribute("aria-pressed", "true")
        chosen.append(take.get_attribute("data-video"))
    board = cluster.client(project).get_storyboard(board_id)
    assert [shot["selected_video_id"] for shot in board["shots"]] == chosen
    remix = board["shots"][0]["videos"][2]
    assert {video["quality"] for shot in board["shots"] for video in shot["videos"]} == {
        "draft"
    }  # interactive

    second_row = rows.nth(1)
    draft = second_row.locator("article.take").first
    draft.get_by_role("button", name="Promote").click()
    expect(draft.get_by_role("button", name="Promoted")).to_be_disabled()
    expect(second_row.locator("article.take")).to_have_count(3)  # the final take joins the shot's row
    final = second_row.locator("article.take").nth(2)
    expect(final.locator(".tier")).to_have_text("Final tier · full quality")
    promoted = cluster.client(project).get(final.get_attribute("data-video"))
    assert promoted["promoted_from"] == draft.get_attribute("data-video") and promoted["quality"] == "final"
    assert promoted["seed"] == cluster.client(project).get(promoted["promoted_from"])["seed"]

    page.get_by_role("button", name="Render first cut").click()
    cut = page.get_by_role("region", name="First cut")
    expect(cut.get_by_role("heading", level=2)).to_contain_text("First cut · 2 clips", timeout=120_000)
    assert cut.locator("video").evaluate("(video) => new URL(video.src).pathname").endswith(".mp4")
    with page.expect_download() as download:
        cut.get_by_role("button", name="Download OTIO package").click()
    archive = ARTIFACTS / "first-cut-otio.zip"
    download.value.save_as(archive)
    with zipfile.ZipFile(archive) as package:
        assert f"{board_id}/timeline.otio" in package.namelist()
    assert [clip["video_id"] for clip in cluster.client(project).get_cut(board_id)["clips"]] == chosen

    page.get_by_role("button", name="Promote selected takes").click()  # both selected takes are drafts
    for row_index in range(2):
        expect(rows.nth(row_index).locator("article.take .tier.final")).to_have_count(1 + row_index)
    assert (
        cluster.client(project).get(remix["video_id"])["prompt"]
        == "a man in a blue trench coat leaps from a tower."
    )


def test_a_blocked_prompt_shows_its_category_and_creates_nothing(page: Page, cluster: Cluster) -> None:
    project = "studio-blocked"
    client = cluster.client(project)
    sign_in(page, cluster, client.http.headers["Authorization"].split()[1])
    expect(page.get_by_role("heading", name=f"Project {project}")).to_be_visible()
    compose(page, [{"Free prompt": "the knight is decapitated in slow motion"}], takes=1)
    page.get_by_role("button", name="Create storyboard").click()
    error = page.locator("li.shot").first.get_by_role("alert").filter(has_text="content policy")
    expect(error).to_have_text("Blocked by the content policy (graphic violence). Nothing was created.")
    expect(page.get_by_role("alert").filter(has_text="content policy")).to_have_count(1)  # said once
    expect(page.get_by_label("Free prompt")).to_have_attribute("aria-invalid", "true")
    assert client.list()["data"] == []
    page.get_by_label("Steps").fill("0")
    page.get_by_label("Free prompt").fill("a quiet harbour")
    page.get_by_role("button", name="Create storyboard").click()
    expect(page.get_by_label("Steps")).to_have_attribute("aria-invalid", "true")  # the 400 names `steps`
    shoot(page, "composer-errors")
    assert client.list()["data"] == []


def test_a_full_queue_says_when_to_try_again(page: Page, cluster: Cluster) -> None:
    project = "studio-full"
    key = cluster.key_for(project)
    store = cluster.store()
    store.update_project(project, {"max_queued_jobs": 1})
    store.close()
    sign_in(page, cluster, key)
    compose(page, [{"Free prompt": "a quiet harbour at dawn"}], takes=2)  # two takes: over the bound
    page.get_by_role("button", name="Create storyboard").click()
    expect(page.locator("#compose-error")).to_contain_text(
        re.compile(r"^The queue is full for this project\. Try again in \d+ s\.$")
    )
    assert cluster.client(project).list()["data"] == []


def test_the_home_lists_boards_and_videos_and_an_admin_manages_keys(page: Page, cluster: Cluster) -> None:
    project = "studio-admin"
    member = cluster.client(project)
    board = member.create_storyboard({"title": "Heist previs", "shots": [{"prompt": "a vault", **TINY}]})
    sign_in(page, cluster, cluster.key_for(project, "admin"))
    expect(page.get_by_role("link", name="Heist previs")).to_be_visible()
    videos = page.get_by_role("list", name="Recent videos").get_by_role("listitem")
    expect(videos).to_have_count(1)
    expect(videos.first).to_contain_text("a vault")
    admin = page.get_by_role("region", name="Administration")
    expect(admin.get_by_role("heading", name=project)).to_be_visible()
    admin.get_by_role("combobox", name=f"Role of a new {project} key").select_option("member")
    admin.get_by_role("button", name="Create key").click()
    secret = admin.locator(".secret")
    expect(secret).to_contain_text(re.compile(r"New member key \(shown once\): pvz_"))
    new_key = secret.inner_text().rsplit(" ", 1)[1]
    key_id = new_key.split("_")[1]
    assert member.http.get("/v1/session", headers={"Authorization": f"Bearer {new_key}"}).status_code == 200
    assert_accessible(page, "home")
    shoot(page, "home")
    admin.get_by_role("button", name=f"Revoke key {key_id}").click()
    keys = admin.get_by_role("list", name=f"Keys of {project}")
    expect(keys.get_by_role("listitem").filter(has_text=f"{key_id} · member · revoked")).to_be_visible()
    assert member.http.get("/v1/session", headers={"Authorization": f"Bearer {new_key}"}).status_code == 401
    page.get_by_role("link", name="Heist previs").click()
    expect(page.get_by_role("heading", name="Heist previs")).to_be_visible()
    assert board["id"] in page.url


def test_a_board_file_dropped_on_the_page_is_created_as_the_cli_would(page: Page, cluster: Cluster) -> None:
    project = "studio-file"
    sign_in(page, cluster, cluster.key_for(project))
    page.get_by_role("link", name="New storyboard").first.click()
    chooser = page.get_by_label("Storyboard file", exact=True)
    chooser.set_input_files({"name": "board.yaml", "mimeType": "application/yaml", "buffer": b"shots: [oops"})
    expect(page.get_by_role("alert").filter(has_text="board.yaml")).to_contain_text("not valid YAML")
    assert cluster.client(project).list()["data"] == []
    board = "title: Rooftops\nshots:\n  - name: 3A\n    prompt: a chase over rooftops\n"
    board += "    resolution: 96x64\n    duration: 0.5\n    steps: 4\nvariants:\n  seeds: [5, 6, 7]\n"
    chooser.set_input_files({"name": "board.yaml", "mimeType": "application/yaml", "buffer": board.encode()})
    expect(page.get_by_role("heading", name="Rooftops", exact=True)).to_be_visible()
    expect(page.locator("article.take")).to_have_count(3)
    assert [video["seed"] for video in cluster.client(project).list()["data"]] == [7, 6, 5]
