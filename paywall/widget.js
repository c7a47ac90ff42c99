/* Meterlane quota widget: an end user's limits (used, remaining, when each resets) and, once a
 * quota is spent, the paywall offers with their full disclosure and a button to the app's
 * checkout. No dependencies, no CDN. Include it with an end-user key:
 *
 *   <div id="quota"></div>
 *   <script src="https://meterlane.example/widget.js" data-key="mlk_..." data-target="#quota"
 *           data-checkout-url="https://app.example/checkout" data-jurisdiction="DE"
 *           data-locale="de"></script>
 *
 * Every text is set with textContent (never parsed as HTML).
 */
(function () {
  "use strict";
  var script = document.currentScript;
  if (!script) { return; }
  var base = new URL(script.src).origin;
  var key = script.getAttribute("data-key") || "";
  var target = null;
  try {
    target = document.querySelector(script.getAttribute("data-target") || "#meterlane-quota");
  } catch (e) { /* an invalid selector: the widget goes right after its script tag */ }
  var checkoutUrl = script.getAttribute("data-checkout-url") || "";
  var jurisdiction = script.getAttribute("data-jurisdiction") || "";
  var locale = script.getAttribute("data-locale") || navigator.language || "";
  if (!target) {
    target = document.createElement("div");
    script.parentNode.insertBefore(target, script);
  }

  // A small stylesheet, scoped by class: the decline is as prominent as the call to action
  // (DSC-09) and the disclosure as large as the text around it (DSC-02).
  if (!document.getElementById("ml-widget-style")) {
    var style = document.createElement("style");
    style.id = "ml-widget-style";
    style.textContent = [
      ".ml-widget{font:14px/1.4 system-ui,sans-serif;max-width:520px;border:1px solid #ddd;",
      "border-radius:8px;padding:12px;color:#111}",
      ".ml-plan{font-weight:600;margin-bottom:8px}.ml-limit{margin-bottom:10px}",
      ".ml-bar{height:8px;background:#eee;border-radius:4px;overflow:hidden;margin:4px 0}",
      ".ml-fill{height:100%;background:#2563eb}",
      ".ml-widget[data-state=spent] .ml-fill{background:#dc2626}",
      ".ml-used,.ml-remaining,.ml-resets{display:inline-block;margin-right:12px;color:#333}",
      ".ml-offer{border-top:1px solid #ddd;margin-top:12px;padding-top:12px}",
      ".ml-offer-headline{font-weight:600}.ml-disclosure{margin:8px 0}",
      ".ml-cta,.ml-decline{display:inline-block;font:15px system-ui,sans-serif;padding:8px 14px;",
      "border-radius:6px;margin-right:10px;cursor:pointer}",
      ".ml-cta{background:#111;color:#fff;text-decoration:none;border:1px solid #111}",
      ".ml-decline{background:#fff;color:#111;border:1px solid #111}",
      ".ml-error{color:#b91c1c}.ml-policies{margin:0 0 10px;font-size:13px}",
      ".ml-policy{color:#1d4ed8}"
    ].join("");
    document.head.appendChild(style);
  }

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) { node.className = cls; }
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    return node;
  }

  function api(path) {
    return fetch(base + path, { headers: { "Authorization": "Bearer " + key } })
      .then(function (resp) {
        return resp.json().catch(function () { return {}; }).then(function (body) {
          if (!resp.ok) {
            var err = new Error(body.detail || body.title || ("HTTP " + resp.status));
            err.status = resp.status;
            throw err;
          }
          return body;
        });
      });
  }

  function when(iso) {
    if (!iso) { return "as running calls end"; }
    var d = new Date(iso);
    return isNaN(d) ? iso : d.toLocaleString(locale || undefined, { timeZoneName: "short" });
  }

  function number(value) {
    return typeof value === "number" ? value.toLocaleString(locale || undefined) : String(value);
  }

  // The widget's words in the user's language (served by Meterlane: /widget/texts).
  var texts = {used: "{n} used", left: "{n} left", resets: "resets {when}",
               used_of: "{n} of {limit} {unit} used", left_unit: "{n} {unit} left",
               frees: "frees up as running calls end", decline: "Not now",
               expired: "Your quota session has expired: reload the page to see your quota.",
               failed: "The quota could not be loaded ({why})."};
  function say(name, values) {
    return String(texts[name]).replace(/\{(\w+)\}/g, function (_, k) {
      return values && values[k] !== undefined ? String(values[k]) : "";
    });
  }

  function renderLimit(line) {
    var row = el("div", "ml-limit");
    row.setAttribute("data-limit", line.id);
    row.appendChild(el("div", "ml-limit-name", line.name || line.id));
    var used = typeof line.used === "number" ? line.used : parseFloat(line.used);
    var total = typeof line.limit === "number" ? line.limit : parseFloat(line.limit);
    var bar = el("div", "ml-bar");
    var fill = el("div", "ml-fill");
    var pct = total > 0 ? Math.min(100, Math.round(used * 100 / total)) : 0;
    fill.style.width = pct + "%";
    bar.appendChild(fill);
    row.appendChild(bar);
    if (line.unit) {  // a meter's limit: "3 of 10 searches used", "7 searches left"
      row.appendChild(el("div", "ml-used", say("used_of", {
        n: number(line.used), limit: number(line.limit), unit: line.unit})));
      row.appendChild(el("div", "ml-remaining", say("left_unit", {
        n: number(line.remaining), unit: line.unit})));
    } else {
      row.appendChild(el("div", "ml-used", say("used", {n: number(line.used)})));
      row.appendChild(el("div", "ml-remaining", say("left", {n: number(line.remaining)})));
    }
    row.appendChild(el("div", "ml-resets", line.resets_at ? say("resets", {when: when(line.resets_at)})
                                                            : say("frees")));
    return row;
  }

  function renderOffer(offer, box) {
    var card = el("div", "ml-offer");
    card.setAttribute("data-offer", offer.offer);
    card.appendChild(el("div", "ml-offer-headline", offer.headline || offer.offer));
    card.appendChild(el("div", "ml-offer-price", offer.price_label || offer.price));
    // The disclosure sits right beside the button (DSC-02), in full, with its policies as links.
    var disclosure = el("div", "ml-disclosure", offer.disclosure);
    disclosure.style.whiteSpace = "pre-wrap";
    card.appendChild(disclosure);
    var links = el("div", "ml-policies");
    (offer.policy_links || []).forEach(function (link, i) {
      if (!/^https?:\/\//.test(link.url)) { return; }
      if (i) { links.appendChild(document.createTextNode(" \u00b7 ")); }
      var a = el("a", "ml-policy", link.label);
      a.href = link.url;
      a.target = "_blank";
      a.rel = "noopener noreferrer";
      links.appendChild(a);
    });
    card.appendChild(links);
    var cta = el("a", "ml-cta", offer.cta_label);
    var url = new URL(checkoutUrl || "/checkout", document.baseURI);
    url.searchParams.set("offer", offer.offer);
    url.searchParams.set("version", String(offer.version));
    url.searchParams.set("content_hash", offer.content_hash);
    // What the offer was rendered for: the app records the consent to exactly this.
    url.searchParams.set("jurisdiction", offer.jurisdiction);
    url.searchParams.set("locale", offer.locale);
    url.searchParams.set("platform", "web");
    cta.href = url.toString();
    cta.setAttribute("role", "button");
    card.appendChild(cta);
    var decline = el("button", "ml-decline", offer.decline_label || say("decline"));
    decline.type = "button";
    decline.addEventListener("click", function () { box.removeChild(card); });
    card.appendChild(decline);
    return card;
  }

  function render(quota, offers) {
    target.textContent = "";
    var box = el("div", "ml-widget");
    box.appendChild(el("div", "ml-plan", quota.plan && (quota.plan.name || quota.plan.id)));
    var spent = false;
    (quota.limits || []).forEach(function (line) {
      box.appendChild(renderLimit(line));
      // A quota on every model (not one model's) with under 0.1 % left: calls stop there.
      var left = parseFloat(line.remaining), total = parseFloat(line.limit);
      if (line.kind !== "rate" && !line.model && (left <= 0 || left * 1000 < total)) {
        spent = true;
      }
    });
    if (spent && offers && offers.data && offers.data.length) {
      var list = el("div", "ml-offers");
      offers.data.forEach(function (offer) { list.appendChild(renderOffer(offer, list)); });
      box.appendChild(list);
    }
    box.setAttribute("data-state", spent ? "spent" : "ok");
    target.appendChild(box);
  }

  function fail(err) {
    target.textContent = "";
    var msg = err.status === 401 ? say("expired") : say("failed", {why: err.message});
    var box = el("div", "ml-error", msg);
    box.setAttribute("data-status", String(err.status || 0));
    target.appendChild(box);
  }

  if (!key) {
    fail({ status: 0, message: "the widget has no data-key (an end-user key)" });
    return;
  }
  var query = "?platform=web" + (jurisdiction ? "&jurisdiction=" + encodeURIComponent(jurisdiction) : "")
    + (locale ? "&locale=" + encodeURIComponent(locale) : "");
  var wording = fetch(base + "/widget/texts?locale=" + encodeURIComponent(locale || "en"))
    .then(function (resp) { return resp.ok ? resp.json() : {}; })
    .then(function (body) { if (body.texts) { texts = body.texts; } })
    .catch(function () { /* the English words stay */ });
  wording.then(function () {
    return api("/v1/me/quota" + (locale ? "?locale=" + encodeURIComponent(locale) : ""));
  }).then(function (quota) {
    // Offers are extra: if they cannot be loaded, the quota still shows.
    return api("/v1/paywall/offers" + query)
      .catch(function () { return { data: [] }; })
      .then(function (offers) { render(quota, offers); });
  }).catch(fail);
})();
