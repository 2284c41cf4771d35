// Drives the reviewer console in headless Chromium, as a reviewer would, keyboard only.
//
// Run by tests/tests/review_console.rs, which starts the services and reads this script's stdout:
//   REFUSED non-reviewer  the NON_REVIEWER_KEY was turned away at sign-in
//   READY                 signed in, the queue is open and empty, waiting for an item
//   ARRIVED <id>          an item appeared in the queue without a reload
//   APPROVED <id> <keys>  approved with the keyboard (<keys>: keystrokes it took)
//   WEIGHT <bytes>        bytes the browser downloaded to open the console
// After READY the test sends a flagged request through the router.
//
// Environment: CONSOLE_URL, REVIEWER_KEY, REVIEWER_NAME, SCREENSHOTS (a folder),
// NON_REVIEWER_KEY (optional: a key that must be refused at sign-in), CHROMIUM (default
// /usr/bin/chromium).
import { createRequire } from "node:module";
import { chromium } from "playwright-core";

const require = createRequire(import.meta.url);

const url = process.env.CONSOLE_URL;
const key = process.env.REVIEWER_KEY;
const name = process.env.REVIEWER_NAME || "ada";
const shots = process.env.SCREENSHOTS || ".";
const timeout = 20000;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  // A closed network: no background connections, no first-run work, no sandbox as root.
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  const bodies = [];
  page.on("response", (response) => {
    if (!response.url().includes("/api/")) {
      bodies.push(response.body().then((body) => body.length, () => 0));
    }
  });
  const errors = [];
  page.on("pageerror", (error) => errors.push(String(error)));

  await page.goto(url, { waitUntil: "load" });
  // A key of the tenant without the reviewer role is turned away at sign-in, saying why.
  if (process.env.NON_REVIEWER_KEY) {
    await page.focus("#key");
    await page.keyboard.type(process.env.NON_REVIEWER_KEY);
    await page.keyboard.press("Tab");
    await page.keyboard.type(name);
    await page.keyboard.press("Enter");
    await page.waitForFunction(
      () => document.getElementById("signin-error")?.textContent.includes("reviewer role"),
      null, { timeout },
    );
    console.log("REFUSED non-reviewer");
    await page.fill("#key", "");
    await page.fill("#reviewer", "");
  }
  // Sign in with the keyboard: Tab to each field, type, Enter.
  await page.focus("#key");
  await page.keyboard.type(key);
  await page.keyboard.press("Tab");
  await page.keyboard.type(name);
  await page.keyboard.press("Enter");
  await page.waitForSelector("#workspace:not([hidden])", { timeout });
  await page.waitForSelector("#live:not(.off)", { timeout });
  const weight = (await Promise.all(bodies)).reduce((sum, n) => sum + n, 0);
  console.log(`WEIGHT ${weight}`);
  console.log("READY");

  // The test now sends a flagged request through the router; the item must appear by itself.
  const row = await page.waitForSelector("#items li[role=option]", { timeout });
  const id = await row.getAttribute("data-id");
  console.log(`ARRIVED ${id}`);
  await page.waitForSelector("#item:not([hidden])", { timeout });
  await page.waitForFunction(
    (id) => document.getElementById("item-id")?.textContent === id, id, { timeout },
  );
  await page.screenshot({ path: `${shots}/queue.png`, fullPage: true });

  // Accessibility: axe-core's WCAG 2 A/AA rules (contrast, names, roles, keyboard) on the queue
  // and item views as the reviewer sees them; any serious or critical violation fails the test.
  await page.addScriptTag({ path: require.resolve("axe-core") });
  const audit = await page.evaluate(() =>
    window.axe.run(document, { runOnly: { type: "tag", values: ["wcag2a", "wcag2aa"] } }));
  const serious = audit.violations.filter((v) => ["serious", "critical"].includes(v.impact));
  for (const violation of audit.violations) {
    console.error(`axe ${violation.impact}: ${violation.id}: ${violation.help} (${violation.nodes.length} nodes)`);
  }
  console.log(`AXE ${audit.passes.length} passed ${audit.violations.length} violations ${serious.length} serious`);
  if (serious.length) process.exitCode = 1;

  // Enter claims the selected item (the item view shows the lease), then `a` approves it.
  let keys = 0;
  await page.focus("#items");
  await page.keyboard.press("Enter");
  keys += 1;
  await page.waitForFunction(
    () => document.getElementById("item-state")?.textContent === "claimed by you", null, { timeout },
  );
  await page.screenshot({ path: `${shots}/item.png`, fullPage: true });
  await page.keyboard.press("a");
  keys += 1;
  await page.waitForFunction(
    (id) => document.getElementById("status")?.textContent === `Approved item ${id}.`, id, { timeout },
  );
  await page.waitForSelector(`#items li[data-id="${id}"]`, { state: "detached", timeout });
  await page.screenshot({ path: `${shots}/approved.png`, fullPage: true });
  console.log(`APPROVED ${id} ${keys}`);
  if (errors.length) {
    console.error(`page errors: ${errors.join("; ")}`);
    process.exitCode = 1;
  }
} finally {
  await browser.close();
}
