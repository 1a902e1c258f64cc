// Open the node's dashboard in Debian's Chromium and use it as an operator would: find the
// study just sent, open its details, read the algorithms and destinations, press Retry on the
// dead letter. Prints one JSON report line; screenshots go to OUT_DIR.
// Usage: node check_dashboard.mjs URL STUDY_UID OUT_DIR CHROMIUM [SCREENSHOT_NAME]
import { chromium } from 'playwright-core';

const [url, studyUid, outDir, chromiumPath, shot = 'dashboard.png'] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: chromiumPath, // Debian's: never let a tool download a browser
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const report = { pageErrors: [], consoleErrors: [] };
try {
  const page = await (await browser.newContext({ viewport: { width: 1400, height: 1000 } })).newPage();
  page.on('pageerror', (e) => report.pageErrors.push(String(e)));
  page.on('console', (m) => { if (m.type() === 'error') report.consoleErrors.push(m.text()); });
  await page.goto(url);
  await page.waitForSelector('body[data-loaded="true"]', { timeout: 30000 });
  const row = page.locator(`tr.study[data-study="${studyUid}"]`);
  await row.waitFor({ timeout: 30000 });
  report.studyListed = true;
  report.banner = (await page.locator('#demo-banner').isVisible())
    ? await page.locator('#demo-banner').textContent() : null;
  report.algorithms = await page.locator('#algorithms tbody tr').allTextContents();
  report.destinations = await page.locator('#destinations tbody tr').allTextContents();
  report.attention = await page.locator('#attention tr.dead-letter').allTextContents();
  report.ready = await page.locator('#ready').textContent();
  report.mode = await page.locator('#mode').textContent();
  report.workers = await page.locator('#workers tbody tr').allTextContents();

  await row.click();
  await page.waitForSelector('.detail .job .timeline', { timeout: 30000 });
  report.steps = await page.locator('.detail .job .timeline .step').allTextContents();
  report.decisions = await page.locator('.detail li').allTextContents();
  report.jobs = await page.locator('.detail .job > div:first-child').allTextContents();
  report.deliveries = await page.locator('.detail .job tbody tr').allTextContents();
  await page.screenshot({ path: `${outDir}/${shot}`, fullPage: true });

  await page.locator('#attention tr.dead-letter button.retry').first().click();
  await page.waitForFunction(() => document.getElementById('notice').textContent !== '', null,
    { timeout: 15000 });
  report.notice = await page.locator('#notice').textContent();
} finally {
  await browser.close();
}
console.log(JSON.stringify(report));
