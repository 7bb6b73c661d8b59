// Herald console: small progressive enhancements (every page works without them).
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  var rows = document.getElementById("condition-rows");
  var template = document.getElementById("condition-row-template");
  var addRow = document.getElementById("add-row");
  if (rows && template && addRow) {
    addRow.addEventListener("click", function (event) {
      event.preventDefault();
      rows.appendChild(template.content.cloneNode(true));
    });
  }
  document.addEventListener("click", function (event) {
    var target = event.target;
    if (target && target.classList && target.classList.contains("remove-row")) {
      event.preventDefault();
      var row = target.closest("tr");
      if (row) { row.remove(); }
    }
  });
  var auth = document.getElementById("auth");
  function showCredentials() {
    if (!auth) { return; }
    document.querySelectorAll(".auth-basic").forEach(function (el) {
      el.hidden = auth.value !== "Basic";
    });
    document.querySelectorAll(".auth-secret").forEach(function (el) {
      el.hidden = auth.value === "None";
    });
  }
  if (auth) {
    auth.addEventListener("change", showCredentials);
    showCredentials();
  }
  var recent = document.getElementById("recent-alert");
  var payload = document.getElementById("payload");
  if (recent && payload) {
    recent.addEventListener("change", function () {
      if (recent.value) { payload.value = recent.value; }
    });
  }
});
