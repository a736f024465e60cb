// The auditor console: keeps the pending requests current from the server's event
// stream (the HTML comes rendered and escaped by the server), and asks before a denial
// or a grant.
"use strict";
(function () {
  const pending = document.getElementById("pending");
  if (pending && window.EventSource) {
    const live = document.createElement("p");
    live.className = "live";
    live.id = "live";
    live.textContent = "Connecting…";
    pending.before(live);
    const stream = new EventSource("/events");
    stream.addEventListener("open", () => {
      live.textContent = "Live: new requests appear here without reloading.";
      live.dataset.state = "open";
    });
    stream.addEventListener("error", () => {
      live.textContent = "Reconnecting…";
      live.dataset.state = "retry";
    });
    stream.addEventListener("pending", (e) => {
      // Keep what the person is typing in a reason field that is still there.
      const typing = document.activeElement;
      const keep = typing && typing.name === "reason" && typing.closest("form")
        ? [typing.closest("form").action, typing.value] : null;
      pending.innerHTML = e.data;
      if (keep) {
        for (const f of pending.querySelectorAll("form")) {
          if (f.action === keep[0] && f.elements.reason) {
            f.elements.reason.value = keep[1];
            f.elements.reason.focus();
          }
        }
      }
      live.dataset.updated = String(Date.now());
    });
    stream.addEventListener("signed_out", () => {
      stream.close();
      window.location.href = "/login?return=%2Frequests";
    });
  }
  document.addEventListener("submit", (e) => {
    const b = e.submitter;
    if (b && b.classList.contains("grant") &&
        !window.confirm("Approve this statement and let this workload's statements under the same rule pass for the chosen window?")) {
      e.preventDefault();
    }
  });
})();
