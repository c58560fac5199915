/* cancernet-batch zoomable map viewer: part of the report folder, no network, no dependencies.
 *
 * Each <div class="zoom" data-view="maps/ID.view.js"> becomes a canvas that draws the input's thumbnail
 * with its P(IDC) map over it. Wheel or the + / - buttons zoom about the pointer, dragging pans,
 * double click or "fit" resets. The tile under the pointer shows its row, column and probability; a
 * click pins it. Regions listed under the canvas zoom to their focus when clicked.
 * The map data come from maps/ID.view.js (written by the report), loaded when the figure is near the
 * screen, so a report of thousands of slides stays light.
 * SPDX-License-Identifier: MIT (same licence as cancernet-batch)
 */
(function () {
  "use strict";
  var LUT = "__INFERNO__";  // 256 RGB colours (hex), the report's colour map
  var ALPHA = 0.55, NONE = 65535;
  var lut = new Uint8Array(768);
  for (var i = 0; i < 768; i++) lut[i] = parseInt(LUT.substr(2 * i, 2), 16);
  var pending = {};

  function decode(b64) {
    var s = atob(b64), n = s.length >> 1, out = new Uint16Array(n);
    for (var i = 0; i < n; i++) out[i] = s.charCodeAt(2 * i) | (s.charCodeAt(2 * i + 1) << 8);
    return out;
  }

  function Viewer(box, d) {
    this.box = box; this.d = d;
    this.p = decode(d.p);
    this.canvas = box.querySelector("canvas");
    this.readout = box.querySelector(".readout");
    this.ctx = this.canvas.getContext("2d");
    this.worldW = Math.max(d.thumbW, d.cols * d.tile);
    this.worldH = Math.max(d.thumbH, d.rows * d.tile);
    this.overlay = this.makeOverlay();
    this.outline = this.makeOutline();
    this.img = new Image();
    var self = this;
    this.img.onload = function () { self.draw(); box.dataset.ready = "1"; };
    this.img.onerror = function () { self.img = null; self.draw(); box.dataset.ready = "1"; };
    this.img.src = d.thumb;
    this.pinned = null;
    this.fit();
    this.listen();
    this.regions();
  }

  Viewer.prototype.prob = function (r, c) {
    if (r < 0 || c < 0 || r >= this.d.rows || c >= this.d.cols) return undefined;
    var v = this.p[r * this.d.cols + c];
    return v === NONE ? null : v / 65534;
  };

  Viewer.prototype.makeOverlay = function () {
    var d = this.d, cv = document.createElement("canvas");
    cv.width = d.cols; cv.height = d.rows;
    var g = cv.getContext("2d"), im = g.createImageData(d.cols, d.rows);
    for (var i = 0; i < d.rows * d.cols; i++) {
      var v = this.p[i];
      if (v === NONE) continue;
      var k = Math.min(255, Math.round(v / 65534 * 255)) * 3;
      im.data[4 * i] = lut[k]; im.data[4 * i + 1] = lut[k + 1]; im.data[4 * i + 2] = lut[k + 2];
      im.data[4 * i + 3] = Math.round(255 * ALPHA);
    }
    g.putImageData(im, 0, 0);
    return cv;
  };

  Viewer.prototype.makeOutline = function () {  // edges between IDC and non-IDC tiles, in tile units
    var d = this.d, path = new Path2D(), self = this;
    function idc(r, c) { var p = self.prob(r, c); return p !== null && p !== undefined && p >= d.thr; }
    for (var r = 0; r <= d.rows; r++) for (var c = 0; c <= d.cols; c++) {
      if (idc(r, c) !== idc(r - 1, c) && c < d.cols) { path.moveTo(c, r); path.lineTo(c + 1, r); }
      if (idc(r, c) !== idc(r, c - 1) && r < d.rows) { path.moveTo(c, r); path.lineTo(c, r + 1); }
    }
    return path;
  };

  Viewer.prototype.fit = function () {
    var w = this.canvas.width, h = this.canvas.height;
    this.s = Math.min(w / this.worldW, h / this.worldH);  // canvas px per level-0 px
    this.ox = (w - this.worldW * this.s) / 2; this.oy = (h - this.worldH * this.s) / 2;
  };

  Viewer.prototype.zoomAt = function (cx, cy, f) {
    var s0 = Math.min(this.canvas.width / this.worldW, this.canvas.height / this.worldH);
    var s = Math.max(s0 * 0.5, Math.min(this.s * f, s0 * 256));
    this.ox = cx - (cx - this.ox) * s / this.s; this.oy = cy - (cy - this.oy) * s / this.s;
    this.s = s; this.draw();
  };

  Viewer.prototype.draw = function () {
    var g = this.ctx, d = this.d;
    g.setTransform(1, 0, 0, 1, 0, 0);
    g.fillStyle = "#fff"; g.fillRect(0, 0, this.canvas.width, this.canvas.height);
    g.setTransform(this.s, 0, 0, this.s, this.ox, this.oy);
    g.imageSmoothingEnabled = true;
    if (this.img && this.img.complete && this.img.naturalWidth) g.drawImage(this.img, 0, 0, d.thumbW, d.thumbH);
    g.imageSmoothingEnabled = false;
    g.drawImage(this.overlay, 0, 0, d.cols * d.tile, d.rows * d.tile);
    g.setTransform(this.s * d.tile, 0, 0, this.s * d.tile, this.ox, this.oy);
    g.lineWidth = 1.2 / (this.s * d.tile); g.strokeStyle = "#00e5ff"; g.stroke(this.outline);
    if (this.pinned) {
      g.lineWidth = 2.5 / (this.s * d.tile); g.strokeStyle = "#fff";
      g.strokeRect(this.pinned[1], this.pinned[0], 1, 1);
    }
    g.setTransform(1, 0, 0, 1, 0, 0);
    this.box.dataset.zoom = (this.s / Math.min(this.canvas.width / this.worldW, this.canvas.height / this.worldH)).toFixed(3);
  };

  Viewer.prototype.tileAt = function (cx, cy) {  // canvas px -> [row, col]
    var x = (cx - this.ox) / this.s, y = (cy - this.oy) / this.s;
    return [Math.floor(y / this.d.tile), Math.floor(x / this.d.tile)];
  };

  Viewer.prototype.toCanvas = function (r, c) {  // centre of tile (r, c) in canvas px
    return [this.ox + (c + 0.5) * this.d.tile * this.s, this.oy + (r + 0.5) * this.d.tile * this.s];
  };

  Viewer.prototype.describe = function (rc) {
    var p = this.prob(rc[0], rc[1]);
    if (p === undefined) return "outside the map";
    var um = this.d.tile * this.d.um, where = "row " + rc[0] + ", col " + rc[1] + " (" +
      (rc[1] * um / 1000).toFixed(2) + ", " + (rc[0] * um / 1000).toFixed(2) + " mm)";
    if (p === null) return where + ": not scored";
    return where + ": P(IDC) = " + p.toFixed(3) + (p >= this.d.thr ? " (IDC)" : "");
  };

  Viewer.prototype.pos = function (e) {
    var b = this.canvas.getBoundingClientRect();
    return [(e.clientX - b.left) * this.canvas.width / b.width, (e.clientY - b.top) * this.canvas.height / b.height];
  };

  Viewer.prototype.listen = function () {
    var self = this, cv = this.canvas, drag = null, moved = false;
    cv.addEventListener("wheel", function (e) {
      e.preventDefault();
      var q = self.pos(e);
      self.zoomAt(q[0], q[1], Math.exp(-e.deltaY / 300));
    }, {passive: false});
    cv.addEventListener("mousedown", function (e) { drag = self.pos(e); moved = false; });
    window.addEventListener("mouseup", function () { drag = null; });
    cv.addEventListener("mousemove", function (e) {
      var q = self.pos(e);
      if (drag) {
        if (Math.abs(q[0] - drag[0]) + Math.abs(q[1] - drag[1]) > 2) moved = true;
        self.ox += q[0] - drag[0]; self.oy += q[1] - drag[1]; drag = q; self.draw();
      }
      if (!self.pinned) self.readout.textContent = self.describe(self.tileAt(q[0], q[1]));
    });
    cv.addEventListener("click", function (e) {
      if (moved) return;
      var q = self.pos(e), rc = self.tileAt(q[0], q[1]);
      self.pinned = self.prob(rc[0], rc[1]) === undefined ? null : rc;
      self.readout.textContent = (self.pinned ? "pinned: " : "") + self.describe(rc);
      self.box.dataset.pinned = self.pinned ? rc.join(",") : "";
      self.draw();
    });
    cv.addEventListener("dblclick", function () { self.fit(); self.draw(); });
    this.box.querySelectorAll("button[data-zoom]").forEach(function (b) {
      b.addEventListener("click", function () {
        var z = b.dataset.zoom;
        if (z === "fit") self.fit(), self.draw();
        else self.zoomAt(cv.width / 2, cv.height / 2, parseFloat(z));
      });
    });
  };

  Viewer.prototype.regions = function () {
    var list = this.box.querySelector(".regions"), self = this, rs = this.d.regions || [];
    if (!list) return;
    if (!rs.length) { list.textContent = "No IDC region."; return; }
    var ol = document.createElement("ol");
    rs.forEach(function (r) {
      var li = document.createElement("li"), a = document.createElement("a");
      a.href = "#"; a.textContent = r.area_mm2.toFixed(3) + " mm², " + r.tiles + " tiles, max P " + r.max_p.toFixed(2);
      a.addEventListener("click", function (e) {
        e.preventDefault();
        var b = r.bbox, w = self.canvas.width, h = self.canvas.height;  // [row0, col0, row1, col1) in tiles
        var t = self.d.tile, bw = (b[3] - b[1]) * t, bh = (b[2] - b[0]) * t;
        self.s = Math.min(w / (bw * 1.6), h / (bh * 1.6));
        self.ox = w / 2 - (b[1] * t + bw / 2) * self.s; self.oy = h / 2 - (b[0] * t + bh / 2) * self.s;
        self.draw();
      });
      li.appendChild(a); ol.appendChild(li);
    });
    list.appendChild(ol);
  };

  window.cancernetView = function (d) {  // called by maps/ID.view.js
    var box = pending[d.id];
    if (box && !box.viewer) box.viewer = new Viewer(box, d);
  };

  function load(box) {
    if (box.dataset.loading) return;
    box.dataset.loading = "1";
    pending[box.dataset.id] = box;
    var s = document.createElement("script");
    s.src = box.dataset.view;
    s.onerror = function () { box.querySelector(".readout").textContent = "map data missing: " + box.dataset.view; };
    document.head.appendChild(s);
  }

  function start() {
    var boxes = document.querySelectorAll("div.zoom[data-view]");
    if ("IntersectionObserver" in window) {
      var io = new IntersectionObserver(function (es) {
        es.forEach(function (e) { if (e.isIntersecting) { load(e.target); io.unobserve(e.target); } });
      }, {rootMargin: "600px"});
      boxes.forEach(function (b) { io.observe(b); });
    } else boxes.forEach(load);
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start); else start();
})();
