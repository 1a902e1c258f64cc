// Open a study in OHIF (served with Orthanc's DICOMweb on one origin), load the node's SEG and
// then its SR the way a reader does (double-click in the study browser, the viewport's arrows
// to step through the SR's measurements), and report what the viewer holds and draws:
// segments, the SR measurements with their labels and outlines on screen, page errors, where
// the lesion centre is on screen, and screenshots.
// Usage: node check_ohif.mjs URL STUDY_UID OUT_DIR CHROMIUM '[x, y, z]'
import { chromium } from 'playwright-core';

const [url, studyUid, outDir, chromiumPath, centerJson] = process.argv.slice(2);
const center = JSON.parse(centerJson);
const browser = await chromium.launch({
  executablePath: chromiumPath, // Debian's: never let a tool download a browser
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const context = await browser.newContext({ viewport: { width: 1400, height: 900 } });
const errors = [];

async function openStudy() {
  const page = await context.newPage();
  page.on('pageerror', (e) => errors.push(String(e)));
  await page.goto(`${url}/viewer?StudyInstanceUIDs=${studyUid}`);
  await page.waitForFunction(
    () => window.services?.displaySetService?.getActiveDisplaySets().length >= 3, null,
    { timeout: 120000 });
  // The first-visit tour covers the page; a reader would skip it.
  await page.getByText('Skip all', { exact: true }).first().click({ timeout: 20000 }).catch(() => {});
  return page;
}

// Where the lesion centre, projected onto the active viewport's plane, is on the page.
function projectCenter(page) {
  return page.evaluate((c) => {
    const s = window.services;
    const id = s.viewportGridService.getActiveViewportId();
    const viewport = s.cornerstoneViewportService.getCornerstoneViewport(id);
    const { focalPoint, viewPlaneNormal } = viewport.getCamera();
    const d = [0, 1, 2].reduce((a, i) => a + (c[i] - focalPoint[i]) * viewPlaneNormal[i], 0);
    const onPlane = [0, 1, 2].map((i) => c[i] - d * viewPlaneNormal[i]);
    const [x, y] = viewport.worldToCanvas(onPlane);
    const box = viewport.canvas.getBoundingClientRect();
    const scale = viewport.canvas.width / box.width; // canvas pixels per CSS pixel
    return { x: box.left + x / scale, y: box.top + y / scale, distanceToPlane: Math.abs(d) };
  }, center);
}

// What the SR display tool has drawn: per measurement, its label lines and its outline in
// page coordinates (OHIF draws an outline as a polyline followed by the label's group).
function drawnMeasurements(page) {
  return page.evaluate(() => {
    const layer = document.querySelector('svg.svg-layer');
    if (!layer) return [];
    const box = layer.getBoundingClientRect();
    return Array.from(layer.querySelectorAll('g[data-annotation-uid]')).map((g) => {
      const outline = g.previousElementSibling;
      const points = outline?.tagName === 'polyline'
        ? outline.getAttribute('points').trim().split(/\s+(?=[-\d.]+,)/)
          .map((p) => p.split(',').map(Number)).map(([x, y]) => [box.left + x, box.top + y])
        : [];
      return {
        trackingUid: g.getAttribute('data-annotation-uid'),
        lines: Array.from(g.querySelectorAll('tspan')).map((t) => t.textContent),
        points,
      };
    });
  });
}

async function openSr() {
  const page = await openStudy();
  await page.getByText('SR', { exact: true }).first().dblclick();
  await page.waitForFunction(() => window.services.displaySetService.getActiveDisplaySets()
    .some((d) => d.Modality === 'SR' && d.isLoaded && d.measurements?.length), null,
  { timeout: 60000 });
  const sr = await page.evaluate(() => window.services.displaySetService.getActiveDisplaySets()
    .filter((d) => d.Modality === 'SR')
    .map((d) => ({
      loaded: !!d.isLoaded,
      measurements: d.measurements.map((m) => ({
        trackingUid: m.TrackingUniqueIdentifier,
        graphicType: m.graphicType || null,
        onImage: !!m.loaded,
        labels: m.labels.map((l) => `${l.label}: ${l.value}`),
      })),
    })));
  // OHIF 3.13 adds the SR's annotations to a viewport that may already have rendered the
  // referenced image, and nothing redraws it: the outlines appear once the reader scrolls.
  // A reader browses the stack, so this scrolls one image away and back over the viewport.
  const box = await page.locator('.cornerstone-viewport-element').first().boundingBox();
  await page.mouse.move(box.x + box.width / 2, box.y + box.height / 2);
  for (const delta of [100, -100]) {
    await page.mouse.wheel(0, delta);
    await page.waitForTimeout(1000);
  }
  // Step through every measurement with the viewport's arrows, back to the first one.
  const drawn = {};
  const count = sr[0]?.measurements.length || 0;
  for (let i = 0; i < count; i++) {
    await page.locator('[data-cy="viewport-action-arrows-right"] svg').first().click();
    await page.waitForFunction(() => document.querySelector('svg.svg-layer g[data-annotation-uid]'),
      null, { timeout: 10000 }).catch(() => {});
    await page.waitForTimeout(1500);
    for (const m of await drawnMeasurements(page)) drawn[m.trackingUid] = m;
  }
  const srView = await projectCenter(page);
  await page.screenshot({ path: `${outDir}/ohif-sr.png` });
  await page.close();
  return { sr, drawn: Object.values(drawn), srView };
}

try {
  const page = await openStudy();
  await page.getByText('SEG', { exact: true }).first().dblclick();
  await page.waitForFunction(
    () => window.services.segmentationService.getSegmentations().length > 0, null,
    { timeout: 60000 });
  await page.getByText('Yes', { exact: true }).first().click({ timeout: 10000 }).catch(() => {});
  await page.waitForTimeout(3000);
  const view = await projectCenter(page);
  await page.screenshot({ path: `${outDir}/ohif-seg.png` });
  const segmentations = await page.evaluate(() => window.services.segmentationService
    .getSegmentations().map((s) => ({
      label: s.label,
      segments: Object.values(s.segments || {}).filter(Boolean).map((x) => x.label),
    })));
  await page.close();

  // The SR in a fresh viewer, as a reader opening the report would see it. OHIF 3.13's SR
  // viewport sometimes never draws (a race between its hydration and its element); a reader
  // would reopen the study, and so does this, up to three times, saying how often it did.
  let sr; let drawn; let srView; let opened = 0;
  do {
    opened += 1;
    ({ sr, drawn, srView } = await openSr());
  } while (drawn.length < (sr[0]?.measurements.length || 0) && opened < 3);
  console.log(JSON.stringify({ segmentations, sr, drawn, view, srView, srOpened: opened, errors }));
} finally {
  await browser.close();
}
