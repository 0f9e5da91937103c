// jobhook console: the one script. It refreshes the live part of a page (the element marked
// data-live="true") every data-interval milliseconds: each second while a subscription on it is still
// polling or delivering, less often on a list's first page (for new rows). Everything else works
// without it: forms are plain HTML, confirmations are pages of their own.
"use strict";

(function () {
  const DEFAULT_INTERVAL_MS = 1000;

  function live() {
    return document.querySelector("[data-live]");
  }

  async function refresh() {
    const region = live();
    if (!region || region.dataset.live !== "true") return;
    // A hidden tab asks nothing; it catches up when shown again.
    if (document.hidden) return schedule();
    try {
      const response = await fetch(location.href, { credentials: "same-origin" });
      // Sent to sign-in (the session ended): stop; the next click shows the sign-in page.
      if (response.redirected) return;
      if (response.ok && response.headers.get("content-type")?.startsWith("text/html")) {
        const doc = new DOMParser().parseFromString(await response.text(), "text/html");
        const fresh = doc.querySelector("[data-live]");
        if (!fresh) return;
        // Replaced only when something changed, so focus and selection stay put otherwise.
        if (fresh.outerHTML !== region.outerHTML) {
          region.replaceWith(document.importNode(fresh, true));
        }
      }
    } catch (_) {
      // Offline for a moment: the next tick tries again.
    }
    schedule();
  }

  function schedule() {
    const region = live();
    if (region && region.dataset.live === "true") {
      setTimeout(refresh, Number(region.dataset.interval) || DEFAULT_INTERVAL_MS);
    }
  }

  document.addEventListener("DOMContentLoaded", schedule);
})();
