"""The issue's browser check on the test suite's shared cluster (deploy/local.yaml serves tiny and
tiny-i2v): a panel dropped on a shot in the composer creates an I2V take that the cluster renders (VAE
encode, both experts, decode) and that the contact sheet then shows finished beside the panel. The same
page against the app on loopback, with the take finished by hand, is test_studio_panels.py."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Page, expect

from serve.jobs import JobStatus
from serve.jobs.keyframes import fit_to_size, load_keyframes
from serve.jobs.request import I2V_MODEL
from tests.support.cluster import Cluster
from tests.test_images import encoded
from tests.test_keyframes_live import artifacts_of
from tests.test_studio_page import browser, page, sign_in
from tests.test_studio_panels import drop_file

__all__ = ["browser", "page"]  # the fixtures, shared with test_studio_page

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1500)]  # the session cluster starts first

PROJECT = "studio-panels-live"
TAKE_TIMEOUT_MS = 600_000  # one tiny I2V take through every stage on a 2-core machine


def test_a_dropped_panel_renders_an_i2v_take_that_finishes_on_the_contact_sheet(
    page: Page, cluster: Cluster
) -> None:
    panel = Image.new("RGB", (320, 180), (30, 50, 80))  # dark: the session's frame check passes it
    panel.paste((240, 200, 60), (100, 40, 180, 120))
    sign_in(page, cluster, cluster.key_for(PROJECT))
    page.get_by_role("link", name="New storyboard").first.click()
    shot = page.locator("li.shot").first
    shot.get_by_label("Free prompt").fill("the hero leaps out of the fireball, slow motion")
    drop_file(page, "li.shot .panel", "panel.png", "image/png", encoded(panel))
    expect(shot.get_by_role("img", name="Panel of shot 1")).to_be_visible()
    for field, value in (("Resolution", "96x64"), ("Duration (s)", "0.5"), ("Steps", "4")):
        page.get_by_label(field, exact=True).first.fill(value)
    page.get_by_role("button", name="Create storyboard").click()
    page.wait_for_url("**/#/boards/*")
    board_id = page.url.rsplit("/", 1)[1]

    row = page.locator("section.shot-row").first
    expect(row.locator("img.shot-panel")).to_be_visible()
    take = row.locator("article.take").first
    expect(take).to_have_attribute("data-status", "completed", timeout=TAKE_TIMEOUT_MS)
    expect(take.locator(".status")).to_have_text("Done")
    # the player, with the rendered clip's poster, replaces the progress bar once its links are fetched
    expect(take.locator("video")).to_have_attribute("poster", re.compile("."), timeout=60_000)
    expect(take.locator("progress")).to_have_count(0)

    store = cluster.store()
    try:
        (job,) = store.list(storyboard_id=board_id, limit=10)
    finally:
        store.close()
    assert (job.status, job.request.model) == (JobStatus.SUCCEEDED, I2V_MODEL), job
    assert job.request.keyframes.first.kind == "image"
    first, _last = load_keyframes(artifacts_of(cluster), PROJECT, job.id)
    np.testing.assert_array_equal(first, np.asarray(fit_to_size(panel, 96, 64)))
