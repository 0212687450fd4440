"""The studio page as a director's tool (issue 28), in a real browser (Debian's Chromium, Playwright, axe)
against the live session cluster: a take that waits says where and how many are ahead, then shows its
progress; the board line comes from its takes; takes are named by their stored number, the same number as
in the CLI's file names and the OTIO; the cut stays after a reload and lists its takes; buttons say why
they cannot act; home plays and downloads clips made through the SDK; the page in Chinese (`zh-CN`) shows
no string of the English catalogue.

Screenshots (1280×800 and 390 px) go to test-artifacts/studio/: director-board-*, director-cut-*,
director-home-*, director-board-zh-*."""

from __future__ import annotations

import re
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import opentimelineio as otio
import pytest
from playwright.sync_api import Browser, Page, expect

from serve.editorial.timeline import take_ids
from tests.support.cli_run import previz
from tests.support.cluster import Cluster
from tests.support.safety_hooks import BLOCKED_WIDTH, HELD_WIDTH, HOLD_FILE
from tests.test_studio_i18n import english_chunks
from tests.test_studio_page import ARTIFACTS, WIDTHS, assert_accessible, browser, page, shoot, sign_in

__all__ = ["browser", "page"]  # the fixtures, shared with test_studio_page

pytestmark = pytest.mark.cluster

TINY = {"resolution": "96x64", "duration": 0.5, "steps": 4}
TAKE_TIMEOUT_MS = 600_000  # ten tiny takes through every stage on a 2-core machine
PROJECT = "studio-director"
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
        {"name": "1B", "prompt": "she lands on the next roof and rolls", **TINY},
    ],
    "variants": {"seeds": 5},  # ten takes, for the Scheduler's eight slots
}
HOLD_PROJECT = "studio-director-hold"
HELD_JOB = {
    "prompt": "a held slot",
    "size": f"{HELD_WIDTH}x64",
    "seconds": "0.5",
    "steps": 4,
    "priority": "interactive",
}


def take_card(page: Page, shot: int, take: int):  # noqa: ANN201
    return page.locator("section.shot-row").nth(shot).locator(f'article.take[data-take="{take}"]')


@contextmanager
def slots_held(cluster: Cluster) -> Iterator[list[str]]:
    """Every Scheduler slot held by a job of another project (its clip waits in the session cluster's
    frame check, tests.support.safety_hooks) until the block ends: a board created inside it waits in the
    job queue for certain, not by a race with the Scheduler."""
    client = cluster.client(HOLD_PROJECT)
    slots = cluster.config["applications"][0]["args"]["max_jobs_in_flight"]
    deadline = time.monotonic() + TAKE_TIMEOUT_MS / 1000
    store = cluster.store()
    try:  # another module's job still queued would sit ahead of the board, priced by a bucket of its own
        while left := [job for job in store.queued(limit=50) if job.continues_shot is None]:
            assert time.monotonic() < deadline, f"jobs of other tests stayed queued: {[j.id for j in left]}"
            time.sleep(0.5)
    finally:
        store.close()
    HOLD_FILE.touch()
    try:
        held = [client.create(HELD_JOB)["id"] for _ in range(slots)]
        deadline = time.monotonic() + TAKE_TIMEOUT_MS / 1000
        while any(client.get(job_id)["status"] == "queued" for job_id in held):  # all of them claimed
            assert time.monotonic() < deadline, "the held jobs were not all claimed"
            time.sleep(0.5)
        yield held
    finally:
        HOLD_FILE.unlink(missing_ok=True)


def eta_seconds(status: str) -> int:
    """The seconds of a status line's `about 1 min 5 s left` (or `about 12 s left`)."""
    found = re.search(r"about (?:(\d+) min )?(\d+) s left$", status)
    assert found, status
    return int(found.group(1) or 0) * 60 + int(found.group(2))


# Slow (make test-all) until a full-suite failure is explained: alone it passes every time, but in two full
# runs on the shared session cluster one of the board's takes was claimed while every slot was held, or
# priced behind a job of another test (the held-slot premise broke). The queued wait and ETA it shows are
# also proven by test_studio_screens (browser), test_queue_wait and test_stage_waits.
@pytest.mark.slow
def test_the_board_tells_the_truth_names_takes_and_keeps_its_cut(
    page: Page,
    cluster: Cluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client = cluster.client(PROJECT)
    loose = client.create({"prompt": "a harbour at dawn", "size": "96x64", "seconds": "0.5", "steps": 4})
    cluster.wait_for([loose["id"]])  # a measured run of the takes' size: their ETAs are priced with it
    sign_in(page, cluster, cluster.keys[PROJECT])
    expect(page.get_by_role("heading", name=f"Project {PROJECT}")).to_be_visible(timeout=30_000)
    takes = page.locator("article.take")
    with slots_held(cluster):
        board = client.create_storyboard(BOARD)
        page.goto(f"{cluster.url}/studio/#/boards/{board['id']}")
        expect(takes).to_have_count(10, timeout=30_000)
        assert [
            name.inner_text() for name in page.locator("section.shot-row").first.locator(".take-name").all()
        ] == [f"1A take {n}" for n in range(1, 6)]
        # every take waits in the job queue and says so: its place, counted by the store, and an ETA
        # that includes the wait (ten takes for eight slots: the last two wait for a second round)
        expect(page.locator('article.take[data-waiting="queue"]')).to_have_count(10)
        statuses = page.locator("article.take .status")
        queued = re.compile(
            r"^(Waiting in the studio queue · \d+ ahead|Next in the studio queue) · about .+ left$"
        )
        for index in range(10):
            expect(statuses.nth(index)).to_have_text(queued)
        places = {}
        for status in statuses.all_inner_texts():
            ahead = re.match(r"^Waiting in the studio queue · (\d+) ahead", status)
            places[int(ahead.group(1)) if ahead else 0] = eta_seconds(status)
        assert sorted(places) == list(range(10))
        # nine ahead: a slot frees only after a first round of runs (read from the API: the page rounds both
        # to "about 1 s" where a run of this size takes about a second)
        state = client.get_storyboard(board["id"])
        etas = {
            take["queue_position"]: take["eta_seconds"] for shot in state["shots"] for take in shot["videos"]
        }
        assert sorted(etas) == list(range(10)) and etas[9] > etas[0], etas
        expect(page.locator("#toolbar-reason")).to_contain_text("The first cut waits for 1A, 1B")
        expect(page.get_by_role("button", name="Render first cut")).to_be_disabled()
        assert_accessible(page, "director board, queued")
        shoot(page, "director-board-queued")
        waiting_id = takes.last.get_attribute("data-video")
    # the slots free: the take that waited longest runs, and shows its progress
    waited = page.locator(f'article.take[data-video="{waiting_id}"] .status')
    expect(waited).to_have_text(re.compile(r"(· \d+ %|^Done$)"), timeout=TAKE_TIMEOUT_MS)
    summary = page.locator(".summary")
    assert not re.search(r"in_progress|denoising|_", summary.inner_text()), summary.inner_text()
    for index in range(10):
        expect(takes.nth(index)).to_have_attribute("data-status", "completed", timeout=TAKE_TIMEOUT_MS)
    expect(summary).to_have_text("2 shots · 10 takes · all takes done")
    row_header = page.locator("section.shot-row").first.locator("h2")
    expect(row_header).to_have_text("1A 穿黑色风衣的男人从塔顶跃下")  # name and a short description
    assert (
        "镜头：低角度慢动作"
        in page.locator("section.shot-row")
        .first.locator("details.compiled")
        .text_content()  # closed: on demand
    )
    assert_accessible(page, "director board")
    shoot(page, "director-board")

    # select 1A take 3, promote it: a new take of the shot
    chosen = take_card(page, 0, 3)
    chosen.get_by_role("button", name="Select take").click()
    expect(chosen.get_by_role("button", name="Selected take")).to_have_attribute("aria-pressed", "true")
    chosen.get_by_role("button", name="Promote").click()
    final = take_card(page, 0, 6)
    expect(final.locator(".take-name")).to_have_text("1A take 6 · final from take 3")
    expect(final.locator(".mark")).to_have_text("AI-generated draft")  # the mark stays on every take
    expect(final.locator(".tier")).to_have_text("Final tier · full quality")
    client.cancel(final.get_attribute("data-video"))  # a 40-step final is not needed for the cut
    expect(final).to_have_attribute("data-status", "cancelled")

    page.get_by_role("button", name="Render first cut").click()
    cut = page.get_by_role("region", name="First cut")
    expect(cut.get_by_role("heading", level=2)).to_contain_text("First cut · 2 clips", timeout=120_000)
    used = cut.get_by_role("list", name="Takes in this cut").get_by_role("listitem")
    expect(used).to_have_text(["1A take 3", "1B take 1"])
    mp4 = cut.get_by_role("link", name="Download mp4")
    assert mp4.get_attribute("href").startswith("/v1/") or "artifacts" in mp4.get_attribute("href")
    with page.expect_download() as download:
        cut.get_by_role("button", name="Download OTIO package").click()
    archive = ARTIFACTS / "director-cut-otio.zip"
    download.value.save_as(archive)
    with zipfile.ZipFile(archive) as package:
        timeline = otio.adapters.read_from_string(
            package.read(f"{board['id']}/timeline.otio").decode(), adapter_name="otio_json"
        )
    assert [clip.name for clip in timeline.find_clips()] == ["1A take 3", "1B take 1"]
    assert take_ids(timeline) == [
        chosen.get_attribute("data-video"),
        take_card(page, 1, 1).get_attribute("data-video"),
    ]
    shoot(page, "director-cut")

    # the CLI's file names say the same take number
    monkeypatch.setenv("PREVIZ_API_KEY", cluster.keys[PROJECT])
    args = ["fetch", "--storyboard", board["id"], "-o", str(tmp_path / "cut"), "--server", cluster.url]
    code, _out, err = previz(args, monkeypatch, capsys)
    assert code == 0, err
    assert sorted(path.name for path in (tmp_path / "cut" / "clips").iterdir()) == [
        "001_1A_take3.mp4",
        "002_1B_take1.mp4",
    ]

    page.reload()  # the cut is still there after a reload, with its takes
    expect(cut.get_by_role("heading", level=2)).to_contain_text("First cut · 2 clips")
    expect(cut.get_by_role("list", name="Takes in this cut").get_by_role("listitem")).to_have_text(
        ["1A take 3", "1B take 1"]
    )

    # home plays and downloads a clip made through the SDK (no board)
    cluster.wait_for([loose["id"]])
    page.goto(f"{cluster.url}/studio/#/")
    item = (
        page.get_by_role("list", name="Recent videos")
        .get_by_role("listitem")
        .filter(has_text="a harbour at dawn")
    )
    expect(item.locator("video")).to_have_attribute("poster", re.compile("."))
    expect(item.get_by_role("link", name="Download mp4")).to_have_attribute("download", f"{loose['id']}.mp4")
    assert_accessible(page, "director home")
    shoot(page, "director-home")


def test_the_board_in_chinese_has_no_untranslated_string(browser: Browser, cluster: Cluster) -> None:
    client = cluster.client(PROJECT)
    # a third shot whose clip the frame check refuses: a failure the server reports reaches the page too
    blocked = {"name": "1C", "prompt": "a quiet courtyard", **TINY, "resolution": f"{BLOCKED_WIDTH}x64"}
    board = client.create_storyboard({**BOARD, "shots": [*BOARD["shots"], blocked], "variants": {"seeds": 1}})
    context = browser.new_context(viewport=WIDTHS["desktop"], locale="zh-CN")
    context.set_default_timeout(30_000)
    page = context.new_page()
    try:
        page.goto(f"{cluster.url}/studio/")
        expect(page.get_by_role("heading", name="登录 Previz")).to_be_visible()
        page.get_by_role("button", name="登录").click()  # no key: the API's refusal, in Chinese
        expect(page.locator("#sign-in-error")).to_have_text("请输入项目的 API 密钥。")
        page.get_by_label("API 密钥").fill(cluster.keys[PROJECT])
        page.get_by_role("button", name="登录").click()
        expect(page.get_by_role("heading", name=f"项目 {PROJECT}")).to_be_visible(timeout=30_000)
        page.goto(f"{cluster.url}/studio/#/boards/{board['id']}")
        takes = page.locator("article.take")
        expect(takes).to_have_count(3, timeout=30_000)
        expect(takes.first.locator(".take-name")).to_have_text("1A 第 1 条")
        for index in range(2):
            expect(takes.nth(index)).to_have_attribute("data-status", "completed", timeout=TAKE_TIMEOUT_MS)
        expect(takes.nth(2)).to_have_attribute("data-status", "failed", timeout=TAKE_TIMEOUT_MS)
        expect(takes.nth(2).locator(".status")).to_have_text("失败：成片画面被内容策略拦截")
        expect(page.locator("#toolbar-reason")).to_contain_text("1C 还没有")
        assert page.evaluate("document.documentElement.lang") == "zh-CN"
        shown = page.evaluate(
            """() => [document.body.innerText,
                ...[...document.querySelectorAll('[aria-label]')].map((e) => e.getAttribute('aria-label')),
                ...[...document.querySelectorAll('[title]')].map((e) => e.getAttribute('title'))]
                .join('\\n')"""
        )
        for brief in (BOARD["shots"][1]["prompt"], blocked["prompt"]):  # the director's own English briefs
            shown = shown.replace(brief, "")
        left = [chunk for chunk in english_chunks() if re.search(rf"\b{re.escape(chunk)}\b", shown)]
        assert not left, f"English strings on the Chinese page: {left}"
        assert_accessible(page, "board in Chinese")
        shoot(page, "director-board-zh")
    finally:
        context.close()
