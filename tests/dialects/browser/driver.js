// Drives the unmodified mixpanel-browser SDK in headless Chromium for
// tests/dialects/test_mixpanel_browser.py. Usage: node driver.js PLAN.json
// PLAN: {"chromium": path, "modules": node_modules dir, "gateway": url,
//        "visits": [{"url", "script", "leave_to"?}]}
// Each visit loads `url`, awaits `script` in the page (its value is kept),
// then either waits until the SDK's queues are empty and the gateway has
// been quiet, or (with `leave_to`) navigates away, which hides the page and
// makes the SDK flush its queue with navigator.sendBeacon.
// After each visit it prints one JSON line, {"result": ..., "requests": [the
// gateway requests of that visit]}, and with `pause` waits for a line on stdin.
'use strict';
const fs = require('fs');
const path = require('path');

const plan = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const { chromium } = require(path.join(plan.modules, 'playwright-core'));

const FLAGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync'];
const QUIET_MS = 800;
const BEACON_MS = 1000;
const DEADLINE_MS = 30000;

async function main() {
  const browser = await chromium.launch({ executablePath: plan.chromium, headless: true, args: FLAGS });
  const requests = [];
  let inflight = 0;
  let last = Date.now();
  try {
    const context = await browser.newContext();
    context.on('request', (r) => {
      if (!r.url().startsWith(plan.gateway)) return;
      inflight += 1;
      last = Date.now();
      requests.push({ method: r.method(), url: r.url(), type: r.resourceType(),
        content_type: r.headers()['content-type'] || null, body: r.postData() || null, status: null });
    });
    const settle = (r, status) => {
      if (!r.url().startsWith(plan.gateway)) return;
      inflight -= 1;
      last = Date.now();
      const entry = requests.find((e) => e.url === r.url() && e.status === null);
      if (entry) entry.status = status;
    };
    context.on('requestfinished', async (r) => {
      const response = await r.response();
      settle(r, response ? response.status() : -1);
    });
    context.on('requestfailed', (r) => settle(r, -1));
    const page = await context.newPage();
    page.on('pageerror', (e) => process.stderr.write(`page error: ${e}\n`));
    const stdin = require('readline').createInterface({ input: process.stdin });
    const lines = stdin[Symbol.asyncIterator]();
    for (const visit of plan.visits) {
      const first = requests.length;
      await page.goto(visit.url);
      const result = await page.evaluate(visit.script);
      if (visit.leave_to) {
        // A beacon sent while the page unloads is not seen by the page's
        // network events: page.html notes each one in localStorage instead.
        await page.goto(visit.leave_to);
        await new Promise((resolve) => setTimeout(resolve, BEACON_MS));
      } else {
        // Every request of the visit answered or failed, not only the count
        // of those in flight at zero (a request reported both failed and
        // finished, or a beacon's never, would make that count lie).
        await waitFor(async () => inflight <= 0 && requests.slice(first).every((e) => e.status !== null)
          && Date.now() - last > QUIET_MS && await page.evaluate(
          () => Object.keys(localStorage).filter((k) => /^__mpq_.*_(ev|pp|gr)$/.test(k))
            .every((k) => JSON.parse(localStorage.getItem(k) || '[]').length === 0)), 'empty queues',
        () => page.evaluate(() => ({ ...localStorage })));
      }
      process.stdout.write(JSON.stringify({ result, requests: requests.slice(first) }) + '\n');
      if (visit.pause) await lines.next();
    }
    stdin.close();
  } finally {
    await browser.close();
  }
}

async function waitFor(condition, what, detail = async () => null) {
  const deadline = Date.now() + DEADLINE_MS;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}: ${JSON.stringify(await detail())}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

main().catch((e) => { process.stderr.write(`${e.stack || e}\n`); process.exit(1); });
