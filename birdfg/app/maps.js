// birdfg's maps, drawn in the browser: the js_on_load of each model's map component (gr.HTML).
// `element`, `props`, `server` and `watch` come from Gradio. The server sends each model's maps as
// data (birdfg/app/map_data.py); the photo is the one already in the photo box (#photo img). The
// view (species, "rather than", opacity, each model's map menus) lives in window.birdfg.view;
// the page's controls change it without any request (birdfg/app/ui.py wires them).
const birdfg = (window.birdfg = window.birdfg || {
  maps: {},
  view: { species: "", rather: "", opacity: props.opacity, menus: {} },
});

if (!birdfg.setControls) {
  const RUNNER_UP = props.runner_up_value;

  birdfg.setControls = (layout, values) => {
    // values: the controls' values in the order ui.py lists them (see `layout`).
    const view = birdfg.view;
    view.species = values[layout.species] || "";
    view.rather = values[layout.rather] || "";
    view.opacity = Number(values[layout.opacity]);
    for (const [key, where] of Object.entries(layout.menus)) view.menus[key] = where.map((i) => values[i]);
    for (const map of Object.values(birdfg.maps)) map.redraw(false);
    birdfg.askContrast();
  };

  // A "rather than" species some gradient map was not sent a contrast for: the page's hidden
  // #fetch-contrast button asks the server for it (ui.py), once per answer and species.
  birdfg.askContrast = () => {
    const rather = birdfg.view.rather;
    const lacking = Object.values(birdfg.maps).map((map) => map.lacks(rather)).filter(Boolean);
    const ask = `${lacking.join("|")}|${rather}`;
    if (!lacking.length || birdfg.asked === ask) return;
    birdfg.asked = ask;
    document.getElementById("fetch-contrast")?.click();
  };

  // A photo larger than a map, just chosen: a copy of it at a map's size (props.side), made from
  // the file at once, while it uploads and the server compares it. Painting a phone photo (12 MP)
  // from the photo box's <img> or the file waited for the upload to come back and paid its decode
  // after the first maps had come (benchmarks/README.md, "Browser"). null: the photo fits a map as
  // it is (the photo box's <img> serves as well: a copy cost small photos time in the same
  // benchmark), or this browser does not decode it.
  const SIDE = props.side;
  birdfg.copyOf = (file) => new Promise((resolve) => {
    const img = new Image();
    const url = URL.createObjectURL(file);
    img.onload = () => {
      URL.revokeObjectURL(url);
      const scale = SIDE / Math.max(img.naturalWidth, img.naturalHeight);
      if (!(scale < 1)) return resolve(null);
      const copy = document.createElement("canvas");
      copy.width = Math.max(1, Math.round(img.naturalWidth * scale));
      copy.height = Math.max(1, Math.round(img.naturalHeight * scale));
      const ctx = copy.getContext("2d");
      ctx.imageSmoothingQuality = "high";  // a phone photo shrinks eightfold: no aliasing
      ctx.drawImage(img, 0, 0, copy.width, copy.height);
      resolve(copy);
    };
    img.onerror = () => { URL.revokeObjectURL(url); resolve(null); };
    img.src = url;
  });

  // Its first maps are asked for at once too, by the photo's SHA-256 (server.first_maps: the
  // head start's answer, birdfg/app/head_start.py), and drawn before Gradio's event answers: over
  // the copy, else over the photo box's <img> when it shows that upload already, else over the
  // file as this page decodes it. The event's maps are drawn over the copy too while the photo
  // box shows that upload (`birdfg.chosen`). Anything missing (no head start, another set, no
  // crypto.subtle outside https and localhost) leaves the event's answer to draw them.
  birdfg.drops = 0;
  birdfg.chosen = null;  // {drop, path: the upload on the server, photo: the copy}
  // The photo box's <img> if it shows the upload stored at `path` on the server, else null.
  birdfg.photoBox = (path) => {
    const shown = document.querySelector("#photo img");
    return shown && path && decodeURIComponent(shown.src).endsWith(path) ? shown : null;
  };
  birdfg.early = async (file) => {
    const drop = ++birdfg.drops;
    const maps = Object.entries(birdfg.maps);
    if (!file || !birdfg.server?.first_maps || !globalThis.crypto?.subtle || !maps.length) return;
    const before = maps.map(([, map]) => map.value());  // the values the event's answer replaces
    const copy = birdfg.copyOf(file);
    try {
      const digest = await crypto.subtle.digest("SHA-256", await file.arrayBuffer());
      const hex = Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
      const found = await birdfg.server.first_maps(hex);
      if (!found || drop !== birdfg.drops) return;
      let photo = await copy;
      if (photo) {
        birdfg.chosen = { drop, path: found.path, photo };
      } else {
        const shown = birdfg.photoBox(found.path);
        photo = shown && shown.complete && shown.naturalWidth ? shown : await createImageBitmap(file);
      }
      if (drop !== birdfg.drops) return;
      maps.forEach(([key, map], i) => found.maps[key] && map.early(found.maps[key], photo, before[i], drop));
    } catch (e) {
      // not a picture this browser decodes, or the call failed: the event's answer draws the maps
    }
  };
  // The photo box cleared: maps that came early stand for nothing any more (the cleared value may
  // equal the one they stood in for, so the value alone does not say so).
  birdfg.forget = () => {
    birdfg.drops++;
    birdfg.chosen = null;
    for (const map of Object.values(birdfg.maps)) map.redraw(true);
  };
  document.addEventListener("change", (event) => {
    if (event.target.matches?.("#photo input[type=file]")) birdfg.early(event.target.files?.[0]);
  }, true);
  document.addEventListener("drop", (event) => {
    if (event.target.closest?.("#photo")) birdfg.early(event.dataTransfer?.files?.[0]);
  }, true);

  birdfg.decode = (text) => {
    const bytes = Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
    return new Float32Array(bytes.buffer);
  };

  birdfg.decodeBytes = (text) => Float32Array.from(Uint8Array.from(atob(text), (c) => c.charCodeAt(0)));

  const parse = (value) => {
    // A menu value: "method" or "method:option=<json>" (birdfg/app/view.py).
    if (!value) return [null, null, undefined];
    const colon = value.indexOf(":");
    if (colon < 0) return [value, null, undefined];
    const setting = value.slice(colon + 1);
    const eq = setting.indexOf("=");
    try {
      return [value.slice(0, colon), setting.slice(0, eq), JSON.parse(setting.slice(eq + 1))];
    } catch (e) {
      return [null, null, undefined];
    }
  };

  const optionsKey = (options) => {
    const sorted = {};
    for (const name of Object.keys(options).sort()) sorted[name] = options[name];
    return JSON.stringify(sorted);
  };

  const markdown = (text) =>
    text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/\*\*(.+?)\*\*/g, "<strong>$1</strong>");

  // What one model's map shows under the current view: {grid, caption, parts, pending}.
  birdfg.resolve = (data, view) => {
    let x = view.species ? data.classes.indexOf(view.species) : data.own;
    if (x < 0) x = data.own;
    let y = null;
    if (view.rather === RUNNER_UP) y = data.runner_up;
    else if (view.rather) y = data.classes.indexOf(view.rather);
    if (y === x || y < 0) y = null;

    const menus = view.menus[data.key] || [];
    let [name, option, value] = parse(menus[0]);
    const missing = name && !data.methods[name] && !data.complete;  // the rest of the answer is coming
    if (!data.methods[name]) [name, option] = [data.default, null];
    const method = data.methods[name];
    const options = Object.assign({}, method.defaults);
    if (option) options[option] = value;
    for (const extra of menus.slice(1)) {
      const [of, opt, val] = parse(extra);
      if (of === name && opt) options[opt] = val;
    }
    const shown = method.views[optionsKey(options)] || Object.values(method.views)[0];

    let grid, pending = false, caption;
    const cells = data.grid[0] * data.grid[1];
    if (!method.class_specific) {
      grid = birdfg.decode(shown.map);
      caption = shown.caption;
    } else {
      if (method.linear) {
        const all = birdfg.decode(shown.all);
        grid = all.slice(x * cells, (x + 1) * cells);
        if (y !== null) {
          const other = all.subarray(y * cells, (y + 1) * cells);
          for (let i = 0; i < cells; i++) grid[i] -= other[i];
        }
      } else {
        let found = shown.maps[y === null ? `${x}` : `${x}-${y}`];
        if (!found) {
          pending = true;  // the server sends it (the rest of the classes, or a new contrast)
          found = shown.maps[`${x}`] || shown.maps[`${data.own}`];
          y = shown.maps[`${x}`] ? null : y;
        }
        grid = birdfg.decode(found);
      }
      const own = x === data.own;
      const template = method.captions[y === null ? (own ? "own" : "plain") : (own ? "own_rather" : "rather")];
      caption = template.replace("{species}", data.names[x]).replace("{rather}", y === null ? "" : data.names[y]);
      if (pending) caption += " (the rest of this map is on its way)";
    }
    if (missing) { pending = true; caption += " (the map you chose is on its way)"; }
    const parts = name === data.default && data.parts ? data.parts[String(x)] || [] : [];
    return { grid, caption: markdown(caption), parts, pending };
  };

  // Normalised grid -> Turbo colours, one pixel per cell, scaled over the box by the canvas's
  // own smoothing (bilinear in colour; the server's overlay interpolates values, then colours:
  // the same picture to the eye, at a fraction of the cost of a per-pixel loop in JavaScript).
  const heat = (ctx, grid, rows, cols, box, opacity) => {
    let lo = Infinity, hi = -Infinity;
    for (const v of grid) { if (v < lo) lo = v; if (v > hi) hi = v; }
    const span = hi > lo ? hi - lo : 1;
    const [left, top, width, height] = box;
    if (width < 1 || height < 1) return;
    const cells = new ImageData(cols, rows);
    const lut = birdfg.turbo || (birdfg.turbo = birdfg.decodeBytes(props.turbo));  // 256 RGB triples
    for (let i = 0; i < rows * cols; i++) {
      const c = 3 * Math.min(255, Math.max(0, Math.round(((grid[i] - lo) / span) * 255)));
      cells.data[4 * i] = lut[c]; cells.data[4 * i + 1] = lut[c + 1]; cells.data[4 * i + 2] = lut[c + 2];
      cells.data[4 * i + 3] = 255;
    }
    const layer = birdfg.cellCanvas || (birdfg.cellCanvas = document.createElement("canvas"));
    layer.width = cols; layer.height = rows;
    layer.getContext("2d").putImageData(cells, 0, 0);
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = "high";
    ctx.globalAlpha = Math.min(Math.max(opacity, 0), 1);
    // Cell centres sit half a cell in from the box's edges, as in a bilinear resize.
    ctx.drawImage(layer, left, top, width, height);
    ctx.globalAlpha = 1;
  };

  // The photo, dimmed outside the part the model saw, with the map over that part.
  // `photo`: the photo box's <img>, the copy of a large photo just chosen (birdfg.copyOf), or the
  // ImageBitmap of a smaller one.
  birdfg.paint = (canvas, photo, data, grid, opacity, side) => {
    const [width, height] = [photo.naturalWidth || photo.width, photo.naturalHeight || photo.height];
    const scale = Math.min(1, side / Math.max(width, height));
    canvas.width = Math.max(1, Math.round(width * scale));
    canvas.height = Math.max(1, Math.round(height * scale));
    const ctx = canvas.getContext("2d");
    ctx.drawImage(photo, 0, 0, canvas.width, canvas.height);
    const [l, t, r, b] = [data.box[0] * canvas.width, data.box[1] * canvas.height,
                          data.box[2] * canvas.width, data.box[3] * canvas.height];
    ctx.fillStyle = "rgba(0, 0, 0, 0.35)";  // what the model did not see, at 65 % (as overlay.py)
    ctx.fillRect(0, 0, canvas.width, Math.max(t, 0));
    ctx.fillRect(0, b, canvas.width, canvas.height - b);
    ctx.fillRect(0, Math.max(t, 0), Math.max(l, 0), Math.min(b, canvas.height) - Math.max(t, 0));
    ctx.fillRect(r, Math.max(t, 0), canvas.width - r, Math.min(b, canvas.height) - Math.max(t, 0));
    heat(ctx, grid, data.grid[0], data.grid[1], [l, t, r - l, b - t], opacity);
  };
}

// --- this model's map component ---------------------------------------------------------------
(() => {
  const key = props.model;
  let rendered = 0;
  let drawing = Promise.resolve();

  if (server?.first_maps) birdfg.server = server;
  // Maps that came before the event's answer (birdfg.early), shown until the value changes.
  let early = null;  // {before: the value they stand in for, data, photo, drop: birdfg.drops then}
  const photo = () => {
    if (early && early.drop === birdfg.drops) return early.photo;
    const chosen = birdfg.chosen;
    if (chosen && chosen.drop === birdfg.drops && birdfg.photoBox(chosen.path)) return chosen.photo;
    return document.querySelector("#photo img");
  };
  // The value is the maps as one JSON string (birdfg/app/handlers.py says why); parsed once.
  let parsed = { text: undefined, data: null };
  const current = () => {
    const value = props.value;
    if (early && (value !== early.before || early.drop !== birdfg.drops)) early = null;
    if (early) return early.data;
    if (typeof value !== "string" || !value) return value || null;  // no maps: "" (Gradio's empty HTML) or null
    if (parsed.text !== value) parsed = { text: value, data: JSON.parse(value) };
    return parsed.data;
  };

  const draw = async () => {
    const root = element.querySelector(".birdmap");
    if (!root) return;
    const canvas = root.querySelector("canvas.birdmap-canvas");
    const caption = root.querySelector(".birdmap-caption");
    const parts = root.querySelector(".birdmap-parts");
    const data = current();
    const image = photo();
    if (!data || !data.methods || !image) {
      canvas.width = canvas.height = 0;
      canvas.hidden = true;
      caption.innerHTML = data && data.error ? data.error : "";
      parts.replaceChildren();
      root.dataset.rendered = String(++rendered);
      return;
    }
    if (image.decode && (!image.complete || !image.naturalWidth)) await image.decode().catch(() => {});
    const shown = birdfg.resolve(data, birdfg.view);
    canvas.hidden = false;
    birdfg.paint(canvas, image, data, shown.grid, birdfg.view.opacity, props.side);
    caption.innerHTML = shown.caption;
    canvas.setAttribute("aria-label", caption.textContent);
    parts.replaceChildren(...shown.parts.map(([text, encoded]) => {
      const figure = document.createElement("figure");
      const small = document.createElement("canvas");
      birdfg.paint(small, image, data, birdfg.decodeBytes(encoded), 0.6, props.parts_side);
      const label = document.createElement("figcaption");
      label.textContent = text;
      small.setAttribute("aria-label", `Channel pair ${text}`);
      figure.append(small, label);
      return figure;
    }));
    parts.hidden = shown.parts.length === 0;
    root.dataset.rendered = String(++rendered);
  };

  let drawn = null;  // what the canvas shows: the data's stamp and the view
  const redraw = (force) => {
    const job = () => {
      const data = current();
      const now = JSON.stringify([data && data.stamp, birdfg.view.species, birdfg.view.rather, birdfg.view.opacity,
                                  birdfg.view.menus[key] || []]);
      if (!force && data && data.stamp && now === drawn) return;  // e.g. Gradio sending the same data again
      drawn = now;
      return draw();
    };
    drawing = drawing.then(job, job);  // one draw at a time; a failed one does not stop the next
    return drawing;
  };
  // The answer's stamp if its gradient maps lack a contrast with species `rather`, else null.
  const lacks = (rather) => {
    const data = current();
    if (!data || !data.methods || !rather || rather === props.runner_up_value) return null;
    const y = data.classes.indexOf(rather);
    const gradient = Object.values(data.methods).some((method) => method.class_specific && !method.linear);
    return y >= 0 && gradient && !data.rivals.includes(y) ? data.stamp : null;
  };
  // The first maps of a photo just chosen, standing in for the value `before` until it changes.
  const takeEarly = (text, photo, before, drop) => {
    if (props.value !== before || drop !== birdfg.drops) return;  // the event has answered already
    early = { before, data: JSON.parse(text), photo, drop };
    redraw(true);
  };
  birdfg.maps[key] = { redraw, lacks, value: () => props.value, early: takeEarly };

  element.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-act]");
    const canvas = element.querySelector("canvas.birdmap-canvas");
    if (!button || !canvas || canvas.hidden) return;
    if (button.dataset.act === "download") {
      canvas.toBlob((blob) => {
        const link = document.createElement("a");
        link.href = URL.createObjectURL(blob);
        link.download = `birdfg-${key}.png`;
        link.click();
        setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
      }, "image/png");
    } else if (button.dataset.act === "fullscreen") {
      canvas.requestFullscreen?.();
    }
  });

  watch("value", () => { redraw(false); birdfg.askContrast(); });
  redraw(true);
})();
