// courier console: the overview's live chart (an SVG drawn from /overview.json) and its
// numbers. No library, no inline script (the Content-Security-Policy forbids it).
"use strict";

(function () {
  var SVG = "http://www.w3.org/2000/svg";
  var SERIES = ["completed", "retried", "dead_lettered"];
  var WINDOW = 15 * 60; // seconds shown
  var POLL_MS = 2000;

  function element(name, attributes) {
    var node = document.createElementNS(SVG, name);
    Object.keys(attributes).forEach(function (key) { node.setAttribute(key, attributes[key]); });
    return node;
  }

  function niceMax(value) {
    if (value <= 1) return 1;
    var power = Math.pow(10, Math.floor(Math.log10(value)));
    var steps = [1, 2, 5, 10];
    for (var i = 0; i < steps.length; i++) {
      if (value <= steps[i] * power) return steps[i] * power;
    }
    return 10 * power;
  }

  function draw(svg, data) {
    var box = svg.viewBox.baseVal;
    // Room for the axis labels: values on the left, minutes below, a margin above and right.
    var width = box.width - 24, height = box.height, left = 40, bottom = 20, margin = 12;
    var series = data.series;
    var now = Date.now() / 1000;
    var top = 0;
    SERIES.forEach(function (name) {
      series[name].forEach(function (v) { if (v > top) top = v; });
    });
    top = niceMax(top);
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    function yOf(value) { return margin + (height - bottom - margin) * (1 - value / top); }
    [0, 0.5, 1].forEach(function (fraction) {
      var y = yOf(top * fraction);
      svg.appendChild(element("line", { x1: left, x2: width, y1: y, y2: y, "class": "grid" }));
      var label = element("text", { x: left - 4, y: y + 4, "class": "axis", "text-anchor": "end" });
      label.textContent = String(+(top * fraction).toFixed(2));
      svg.appendChild(label);
    });
    [15, 10, 5, 0].forEach(function (minutes) {
      var x = left + (width - left) * (1 - minutes * 60 / WINDOW);
      var label = element("text", { x: x, y: height - 4, "class": "axis", "text-anchor": "middle" });
      label.textContent = minutes ? "-" + minutes + " min" : "now";
      svg.appendChild(label);
    });
    SERIES.forEach(function (name) {
      var points = series.t.map(function (t, i) {
        var x = left + (width - left) * (1 - Math.min(WINDOW, Math.max(0, now - t)) / WINDOW);
        var y = yOf(series[name][i]);
        return x.toFixed(1) + "," + y.toFixed(1);
      });
      svg.appendChild(element("polyline", { points: points.join(" "), "class": "line " + name }));
    });
    svg.setAttribute("data-points", String(data.points));
    svg.setAttribute("data-updated", String(now));
  }

  // stats' keys are the ids of the elements showing them ("_" for "-").
  function show(stats) {
    Object.keys(stats).forEach(function (key) {
      var node = document.getElementById(key.replace(/_/g, "-"));
      if (node && stats[key] !== null && stats[key] !== undefined) node.textContent = String(stats[key]);
    });
  }

  function poll(svg) {
    fetch(svg.getAttribute("data-source"), { credentials: "same-origin", cache: "no-store" })
      .then(function (response) {
        if (response.status === 401 || response.status === 403) {
          window.location.assign("/login");
          throw new Error("signed out");
        }
        return response.json();
      })
      .then(function (data) {
        draw(svg, data);
        show(data.stats);
      })
      .catch(function () { /* the next poll tries again */ })
      .then(function () { window.setTimeout(function () { poll(svg); }, POLL_MS); });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var svg = document.getElementById("throughput-chart");
    if (!svg) return;
    try {
      draw(svg, JSON.parse(svg.getAttribute("data-chart")));  // the data the page came with
    } catch (ignored) { /* the first poll draws it */ }
    window.setTimeout(function () { poll(svg); }, POLL_MS);
  });
})();
