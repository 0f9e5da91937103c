// The console in a real browser: the system Chromium (Debian's `chromium`), driven by playwright-core,
// against the real jobhook binary, its mock upstream and a recording receiver run here in Node.
//
//   node tests/console/browser-test.mjs target/debug/jobhook
//
// Environment: JOBHOOK_TEST_DATABASE_URL (default: a fresh SQLite file), CHROMIUM (default
// /usr/bin/chromium), SCREENSHOTS=dir (saves console-*.png there). Exits non-zero on the first failure.
// Every check reads what a person sees on the page.

import { chromium } from "playwright-core";
import { spawn } from "node:child_process";
import http from "node:http";
import net from "node:net";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import assert from "node:assert/strict";

const BINARY = path.resolve(process.argv[2] || "target/debug/jobhook");
const KEY_A = "console-test-key-tenant-a-0123456789";
const KEY_B = "console-test-key-tenant-b-0123456789";
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const SCREENSHOTS = process.env.SCREENSHOTS;
const TIMEOUT = 30_000;

const children = [];
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "jobhook-console-"));
let browser;

function step(what) {
  console.log(`--- ${what}`);
}

// Presses Tab until the control named `name` has the focus (so it is reachable by keyboard).
async function tabTo(page, name) {
  for (let i = 0; i < 60; i++) {
    await page.keyboard.press("Tab");
    const focused = await page.evaluate(() => document.activeElement?.textContent?.trim());
    if (focused === name) return;
  }
  throw new Error(`"${name}" cannot be reached with the Tab key`);
}

async function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

function start(args, log) {
  const out = fs.openSync(path.join(tmp, log), "w");
  const child = spawn(BINARY, args, { stdio: ["ignore", out, out], env: { ...process.env, RUST_LOG: "info" } });
  children.push(child);
  return child;
}

async function waitFor(url) {
  const deadline = Date.now() + TIMEOUT;
  while (Date.now() < deadline) {
    try {
      if ((await fetch(url)).ok) return;
    } catch (_) {}
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`${url} did not answer within ${TIMEOUT} ms`);
}

// The receiver: records every request; /flaky answers 500 until fixed, /down always.
const received = [];
let flakyFixed = false;
async function startReceiver() {
  const server = http.createServer((req, res) => {
    let body = "";
    req.on("data", (c) => (body += c));
    req.on("end", () => {
      received.push({ path: req.url, body });
      const status = (req.url === "/flaky" && !flakyFixed) || req.url === "/down" ? 500 : 200;
      res.writeHead(status, { "content-type": "text/plain" }).end(status === 200 ? "ok" : "receiver is down");
    });
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return server;
}

async function main() {
  const receiver = await startReceiver();
  const receiverUrl = `http://127.0.0.1:${receiver.address().port}`;
  const [upstreamPort, appPort] = [await freePort(), await freePort()];
  const upstreamUrl = `http://127.0.0.1:${upstreamPort}`;
  const base = `http://127.0.0.1:${appPort}`;
  const databaseUrl = process.env.JOBHOOK_TEST_DATABASE_URL || `sqlite://${path.join(tmp, "jobhook.db")}`;

  // Jobs stay Pending for 25 polls 400 ms apart (about 10 s): a new row shows up on the list within
  // 5 s (its refresh) and must still be polling then; long enough to cancel one too. A receiver that
  // keeps failing uses up the short retry schedule in about a second.
  start(["mock-upstream", "--listen", `127.0.0.1:${upstreamPort}`, "--pending-polls", "25"], "mock.log");
  start(
    [
      "serve", "--listen", `127.0.0.1:${appPort}`, "--database-url", databaseUrl, "--upstream-url", upstreamUrl,
      "--api-keys", `${KEY_A},${KEY_B}`, "--allow-private-callbacks", "true", "--poll-interval", "400ms",
      "--poll-max-interval", "1s", "--retry-schedule", "300ms,300ms", "--delivery-timeout", "2s",
    ],
    "jobhook.log",
  );
  await waitFor(`${upstreamUrl}/public/v1/job/00000000-0000-4000-8000-000000000000`).catch(() => {});
  await waitFor(`${base}/healthz`);

  const api = async (method, route, body, key = KEY_A) => {
    const response = await fetch(base + route, {
      method,
      headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
      body: body && JSON.stringify(body),
    });
    return { status: response.status, json: response.status === 204 ? null : await response.json() };
  };
  const register = async (callbackPath) => {
    const { status, json } = await api("POST", "/v1/subscriptions", {
      job_id: crypto.randomUUID(),
      callback_url: receiverUrl + callbackPath,
    });
    assert.equal(status, 201, JSON.stringify(json));
    return json;
  };

  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  // Each context is a fresh profile (playwright gives every context its own storage).
  const contextA = await browser.newContext({ viewport: { width: 1200, height: 860 } });
  const page = await contextA.newPage();
  page.setDefaultTimeout(TIMEOUT);
  const cspViolations = [];
  page.on("console", (m) => {
    if (/Content Security Policy/i.test(m.text())) cspViolations.push(m.text());
  });

  step("1. a wrong key shows an error; the right key signs in");
  await page.goto(`${base}/console`);
  await page.getByLabel("API key").fill("not-a-key-of-this-service");
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByText("This API key is not valid").waitFor();
  assert.equal(await page.getByLabel("API key").getAttribute("aria-invalid"), "true");
  // By keyboard alone: the field has the focus again, with the error tied to it.
  assert.equal(await page.evaluate(() => document.activeElement.id), "key");
  assert.match(await page.getByLabel("API key").getAttribute("aria-describedby"), /key-error/);
  await page.keyboard.press("Control+A");
  await page.keyboard.type(KEY_A);
  await page.keyboard.press("Enter");
  await page.getByRole("heading", { name: "Subscriptions" }).waitFor();
  await page.keyboard.press("Tab");
  assert.equal(await page.evaluate(() => document.activeElement.textContent), "Skip to content");
  const cookies = await contextA.cookies();
  const session = cookies.find((c) => c.name === "jobhook_session");
  assert.ok(session && session.httpOnly && session.sameSite === "Strict", JSON.stringify(cookies));

  step("2. a job registered through the API appears and turns from polling to delivered without a reload");
  const navigations = [];
  page.on("framenavigated", (f) => f === page.mainFrame() && navigations.push(f.url()));
  const first = await register("/ok");
  const row = page.getByRole("row").filter({ hasText: first.job_id });
  await row.waitFor({ timeout: 15_000 }); // the first page refreshes every few seconds
  await row.getByText("polling").waitFor();
  await row.getByText("delivered").waitFor({ timeout: 20_000 });
  assert.deepEqual(navigations, [], "the page was not reloaded");

  step("3. a failing receiver's attempts are shown; after the fix, a redelivery adds a 2xx attempt");
  const flaky = await register("/flaky");
  await register("/down"); // ends failed, for the list's screenshot
  await page.goto(`${base}/console/subscriptions/${flaky.id}`);
  await page.locator(".state", { hasText: "failed" }).waitFor({ timeout: 30_000 });
  const timeline = page.locator("ol.timeline li");
  assert.equal(await timeline.count(), 3, "three attempts: the first and two retries");
  for (let i = 0; i < 3; i++) assert.match(await timeline.nth(i).innerText(), /HTTP 500/);
  await page.getByText("delivery_exhausted").waitFor();
  flakyFixed = true;
  // Keyboard only: Tab to each control and press Enter.
  await tabTo(page, "Redeliver…");
  await page.keyboard.press("Enter");
  await page.getByRole("heading", { name: "Redeliver the job's result?" }).waitFor();
  await tabTo(page, "Yes, redeliver");
  await page.keyboard.press("Enter");
  await page.getByText("A new delivery series has started").waitFor();
  await page.locator("ol.timeline li", { hasText: "HTTP 200" }).waitFor({ timeout: 15_000 });
  assert.match(await timeline.last().innerText(), /Series 2, attempt 1 · HTTP 200/);
  await page.locator(".state", { hasText: "delivered" }).waitFor();
  assert.ok(received.some((r) => r.path === "/flaky"), "the receiver got the redelivery");
  if (SCREENSHOTS) await page.screenshot({ path: path.join(SCREENSHOTS, "console-detail.png"), fullPage: true });

  step("4a. registering by hand: the API's validation shows next to the field");
  await page.getByRole("link", { name: "Register a job" }).click();
  await page.getByLabel("Job ID").fill("not-a-uuid");
  await page.getByLabel("Callback URL").fill("ftp://example.com/hook");
  await page.getByRole("button", { name: "Register" }).click();
  assert.equal(await page.getByLabel("Job ID").getAttribute("aria-invalid"), "true");
  assert.equal(await page.getByLabel("Callback URL").getAttribute("aria-invalid"), "true");
  await page.locator("#callback_url-error").waitFor();
  const jobId = crypto.randomUUID();
  await page.getByLabel("Job ID").fill(jobId);
  await page.getByLabel("Callback URL").fill(`${receiverUrl}/by-hand`);
  await page.getByRole("button", { name: "Register" }).click();
  await page.getByText("The job was registered.").waitFor();

  step("4b. cancel works");
  await page.locator(".state", { hasText: "polling" }).waitFor();
  await page.getByRole("link", { name: "Cancel subscription…" }).click();
  await page.getByRole("button", { name: "Yes, cancel it" }).click();
  await page.getByText("The subscription was cancelled.").waitFor();
  await page.locator(".state", { hasText: "cancelled" }).waitFor();
  const byHandId = page.url().split("/").pop().split("?")[0];
  assert.equal((await api("GET", `/v1/subscriptions/${byHandId}`)).json.state, "cancelled");

  step("4c. the secret is masked, revealed on request, and rotation shows a new masked secret");
  await page.getByRole("link", { name: "Signing secret" }).click();
  const secret = page.locator("#secret");
  const before = await secret.innerText();
  assert.match(before, /^whsec_•+.{4}$/);
  await page.getByRole("button", { name: "Reveal secret" }).click();
  assert.equal(await secret.innerText(), (await api("GET", "/v1/signing-secret")).json.secret);
  assert.ok(!page.url().includes("whsec_"), "no secret in the URL");
  await page.getByRole("link", { name: "Hide" }).click();
  await page.getByRole("link", { name: "Rotate secret…" }).click();
  await page.getByText("grace period").first().waitFor();
  await page.getByRole("button", { name: "Yes, rotate the secret" }).click();
  await page.getByText("The secret was rotated").waitFor();
  const after = await secret.innerText();
  assert.match(after, /^whsec_•+.{4}$/);
  assert.notEqual(after, before, "a new secret");
  assert.ok(!page.url().includes("whsec_"), "no secret in the URL");

  step("list filters");
  await page.getByRole("link", { name: "Subscriptions" }).click();
  // Filters: state and job ID.
  await page.getByLabel("State").selectOption("expired");
  await page.getByRole("button", { name: "Filter" }).click();
  await page.getByText("No subscriptions match").waitFor();
  await page.getByLabel("State").selectOption("delivered");
  await page.getByLabel("Job ID").fill(first.job_id);
  await page.getByRole("button", { name: "Filter" }).click();
  await page.getByRole("row").filter({ hasText: first.job_id }).waitFor();
  assert.equal(await page.locator("table.subs tbody tr").count(), 1);

  step("5. tenant B cannot open tenant A's subscription; a POST without the CSRF token is refused");
  const contextB = await browser.newContext();
  const pageB = await contextB.newPage();
  pageB.setDefaultTimeout(TIMEOUT);
  await pageB.goto(`${base}/console/sign-in`);
  await pageB.getByLabel("API key").fill(KEY_B);
  await pageB.getByRole("button", { name: "Sign in" }).click();
  await pageB.getByRole("heading", { name: "Subscriptions" }).waitFor();
  const response = await pageB.goto(`${base}/console/subscriptions/${first.id}`);
  assert.equal(response.status(), 404);
  await pageB.getByRole("heading", { name: "Not found" }).waitFor();
  const live = await register("/ok"); // tenant A's, still polling

  step("screenshots of the list");
  await page.goto(`${base}/console/subscriptions`);
  await page.getByRole("row").filter({ hasText: live.job_id }).getByText("polling").waitFor();
  await page.locator(".state", { hasText: "failed" }).waitFor();
  if (SCREENSHOTS) {
    await page.screenshot({ path: path.join(SCREENSHOTS, "console-list.png"), fullPage: true });
    await page.setViewportSize({ width: 390, height: 844 });
    await page.screenshot({ path: path.join(SCREENSHOTS, "console-phone.png") });
    await page.setViewportSize({ width: 1200, height: 860 });
  }
  const refusedStatus = await page.evaluate(async (id) => {
    const r = await fetch(`/console/subscriptions/${id}/cancel`, {
      method: "POST",
      headers: { "content-type": "application/x-www-form-urlencoded" },
      body: "confirm=1",
    });
    return r.status;
  }, live.id);
  assert.equal(refusedStatus, 403, "a POST without the CSRF token is refused");
  assert.notEqual((await api("GET", `/v1/subscriptions/${live.id}`)).json.state, "cancelled");

  step("sign out");
  await page.getByRole("button", { name: "Sign out" }).click();
  await page.getByText("You have signed out.").waitFor();
  await page.goto(`${base}/console/subscriptions`);
  await page.getByRole("heading", { name: "Sign in" }).waitFor();

  assert.deepEqual(cspViolations, [], "no Content-Security-Policy violations");
  console.log("console browser test: all checks passed");
}

let failed = false;
try {
  await main();
} catch (e) {
  failed = true;
  console.error("console browser test FAILED:", e);
  for (const log of ["jobhook.log", "mock.log"]) {
    const file = path.join(tmp, log);
    if (fs.existsSync(file)) console.error(`--- last lines of ${log}\n` + fs.readFileSync(file, "utf8").split("\n").slice(-30).join("\n"));
  }
} finally {
  if (browser) await browser.close().catch(() => {});
  for (const child of children) child.kill("SIGTERM");
  fs.rmSync(tmp, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
