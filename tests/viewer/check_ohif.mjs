// Open a study in OHIF (served with Orthanc's DICOMweb on one origin), load the node's SEG and
// SR the way a reader does (double-click in the study browser), and report what the viewer
// holds: segments, SR measurements, page errors, where the nodule centre is on screen, and a
// screenshot. Usage: node check_ohif.mjs URL STUDY_UID OUT_DIR CHROMIUM '[x, y, z]'
import { chromium } from 'playwright-core';

const [url, studyUid, outDir, chromiumPath, centerJson] = process.argv.slice(2);
const center = JSON.parse(centerJson);
const browser = await chromium.launch({
  executablePath: chromiumPath, // Debian's: never let a tool download a browser
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const page = await (await browser.newContext({ viewport: { width: 1400, height: 900 } })).newPage();
const errors = [];
page.on('pageerror', (e) => errors.push(String(e)));
try {
  await page.goto(`${url}/viewer?StudyInstanceUIDs=${studyUid}`);
  await page.waitForFunction(
    () => window.services?.displaySetService?.getActiveDisplaySets().length >= 3, null,
    { timeout: 120000 });
  // The first-visit tour covers the page; a reader would skip it.
  await page.getByText('Skip all', { exact: true }).first().click({ timeout: 20000 }).catch(() => {});
  await page.getByText('SEG', { exact: true }).first().dblclick();
  await page.waitForFunction(
    () => window.services.segmentationService.getSegmentations().length > 0, null,
    { timeout: 60000 });
  await page.getByText('Yes', { exact: true }).first().click({ timeout: 10000 }).catch(() => {});
  await page.waitForTimeout(3000);
  const view = await page.evaluate((c) => {
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
  await page.screenshot({ path: `${outDir}/ohif-seg.png` });
  const segmentations = await page.evaluate(() => window.services.segmentationService
    .getSegmentations().map((s) => ({
      label: s.label,
      segments: Object.values(s.segments || {}).filter(Boolean).map((x) => x.label),
    })));
  await page.getByText('SR', { exact: true }).first().dblclick();
  await page.waitForTimeout(8000);
  const sr = await page.evaluate(() => window.services.displaySetService.getActiveDisplaySets()
    .filter((d) => d.Modality === 'SR')
    .map((d) => ({ loaded: !!d.isLoaded, graphicTypes: (d.measurements || []).map((m) => m.graphicType || null) })));
  await page.screenshot({ path: `${outDir}/ohif-sr.png` });
  console.log(JSON.stringify({ segmentations, sr, view, errors }));
} finally {
  await browser.close();
}
