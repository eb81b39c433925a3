// MultiMail dashboard: live queue updates over server-sent events, copy buttons and
// confirmations. Written for this project; no framework, no build step. Every page works
// without it (forms post normally); this only saves reloads and clicks.
(function () {
  "use strict";

  var body = document.body;
  var eventsUrl = body.getAttribute("data-events");

  function setCount(count) {
    var badges = document.querySelectorAll("[data-pending-count]");
    for (var i = 0; i < badges.length; i++) {
      badges[i].textContent = String(count);
      badges[i].classList.toggle("zero", count === 0);
    }
    var batch = document.getElementById("batch");
    if (batch) { batch.hidden = count === 0; }
    var base = body.getAttribute("data-title") || document.title;
    if (document.getElementById("queue")) {
      document.title = "(" + count + ") Pending — MultiMail";
    } else {
      document.title = base;
    }
  }

  function digestOf(queue, id) {
    var fields = queue.querySelectorAll("input[data-digest-of]");
    for (var i = 0; i < fields.length; i++) {
      if (fields[i].getAttribute("data-digest-of") === id) { return fields[i].value; }
    }
    return null;
  }

  function refreshQueue(state) {
    var queue = document.getElementById("queue");
    if (!queue) { return; }
    // "changed" moves when an agent edits a waiting draft in place: the card is redrawn.
    if (queue.getAttribute("data-newest") === String(state.newest || "") &&
        queue.getAttribute("data-count") === String(state.count) &&
        queue.getAttribute("data-changed") === String(state.changed || "")) {
      return;
    }
    fetch(queue.getAttribute("data-items"), { credentials: "same-origin" })
      .then(function (response) {
        if (!response.ok) { throw new Error("queue refresh failed: " + response.status); }
        return response.text();
      })
      .then(function (html) {
        // Keep the operator's ticks for the batch form across the refresh, but only on
        // drafts that did not change: a tick was given to the draft the operator read.
        var ticked = {};
        var boxes = queue.querySelectorAll("input[name=ids]:checked");
        for (var i = 0; i < boxes.length; i++) {
          ticked[boxes[i].value] = digestOf(queue, boxes[i].value);
        }
        queue.innerHTML = html;
        boxes = queue.querySelectorAll("input[name=ids]");
        for (var j = 0; j < boxes.length; j++) {
          var id = boxes[j].value;
          boxes[j].checked = ticked.hasOwnProperty(id) && ticked[id] === digestOf(queue, id);
        }
        queue.setAttribute("data-newest", String(state.newest || ""));
        queue.setAttribute("data-count", String(state.count));
        queue.setAttribute("data-changed", String(state.changed || ""));
      })
      .catch(function () { /* the next event tries again */ });
  }

  if (eventsUrl && window.EventSource) {
    var source = new EventSource(eventsUrl);
    source.addEventListener("pending", function (event) {
      var state = JSON.parse(event.data);
      setCount(state.count);
      refreshQueue(state);
    });
  }

  document.addEventListener("change", function (event) {
    var all = event.target.closest("[data-select-all]");
    if (!all) { return; }
    var boxes = document.querySelectorAll(
      "input[type=checkbox][name='" + all.getAttribute("data-select-all") + "']");
    for (var i = 0; i < boxes.length; i++) { boxes[i].checked = all.checked; }
  });

  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-copy]");
    if (!button) { return; }
    var target = document.getElementById(button.getAttribute("data-copy"));
    if (!target) { return; }
    var text = target.textContent;
    var done = function () {
      var label = button.textContent;
      button.textContent = "Copied";
      setTimeout(function () { button.textContent = label; }, 1500);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done);
    } else {
      var range = document.createRange();
      range.selectNodeContents(target);
      var selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      try { document.execCommand("copy"); done(); } catch (e) { /* text stays selected */ }
    }
  });

  document.addEventListener("submit", function (event) {
    var message = event.target.getAttribute("data-confirm");
    if (message && !window.confirm(message)) { event.preventDefault(); }
  });
})();
