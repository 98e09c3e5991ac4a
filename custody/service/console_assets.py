"""The approval console's script and style, served from /console/ (no inline script: the pages'
Content-Security-Policy allows scripts from the console only)."""

SCRIPT = r"""
"use strict";
const b64u = {
  enc(buf) {
    const bytes = new Uint8Array(buf);
    let s = "";
    for (const b of bytes) s += String.fromCharCode(b);
    return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  },
  dec(text) {
    const s = atob(text.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((text.length + 3) % 4));
    return Uint8Array.from(s, (c) => c.charCodeAt(0));
  },
};
function hexBytes(hex) {
  return Uint8Array.from(hex.match(/../g), (h) => parseInt(h, 16));
}
function say(text, state) {
  const out = document.getElementById("result");
  out.textContent = text;
  out.className = state;
}
async function answer(res) {
  const body = await res.json();
  if (!res.ok) throw new Error(body.error ? body.error.message : res.statusText);
  return body;
}
async function approve(form) {
  const name = document.getElementById("employee").value;
  const who = await answer(await fetch("/console/api/employees/" + encodeURIComponent(name)));
  const cred = await navigator.credentials.get({
    publicKey: {
      challenge: hexBytes(form.dataset.digest),
      rpId: who.rp_id,
      allowCredentials: who.credentials.map((id) => ({ type: "public-key", id: b64u.dec(id) })),
      userVerification: "required",
      timeout: 120000,
    },
  });
  const body = {
    employee: name,
    credential_id: b64u.enc(cred.rawId),
    authenticator_data: b64u.enc(cred.response.authenticatorData),
    client_data_json: b64u.enc(cred.response.clientDataJSON),
    signature: b64u.enc(cred.response.signature),
  };
  const w = await answer(
    await fetch("/console/api/withdrawals/" + form.dataset.withdrawal + "/approve", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    }),
  );
  document.getElementById("approved-by").textContent = w.approvals.valid.join(", ") || "none";
  say("approved: " + w.approvals.valid.length + " valid approval(s), status " + w.status, "ok");
}
async function register(form) {
  const name = document.getElementById("employee").value;
  const cred = await navigator.credentials.create({
    publicKey: {
      rp: { id: location.hostname, name: "custody" },
      user: { id: new TextEncoder().encode(name), name: name, displayName: name },
      challenge: crypto.getRandomValues(new Uint8Array(32)),
      pubKeyCredParams: [{ type: "public-key", alg: -7 }],
      authenticatorSelection: { userVerification: "required" },
      attestation: "none",
      timeout: 120000,
    },
  });
  const made = await answer(
    await fetch("/console/api/register", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({
        attestation_object: b64u.enc(cred.response.attestationObject),
        client_data_json: b64u.enc(cred.response.clientDataJSON),
      }),
    }),
  );
  document.getElementById("credential").textContent = JSON.stringify(made, null, 2);
  say("credential made: give it to the founders for the roster (" + name + ")", "ok");
}
async function signWith(name, digest) {
  const who = await answer(await fetch("/console/api/employees/" + encodeURIComponent(name)));
  const cred = await navigator.credentials.get({
    publicKey: {
      challenge: hexBytes(digest),
      rpId: who.rp_id,
      allowCredentials: who.credentials.map((id) => ({ type: "public-key", id: b64u.dec(id) })),
      userVerification: "required",
      timeout: 120000,
    },
  });
  return {
    employee: name,
    credential_id: b64u.enc(cred.rawId),
    authenticator_data: b64u.enc(cred.response.authenticatorData),
    client_data_json: b64u.enc(cred.response.clientDataJSON),
    signature: b64u.enc(cred.response.signature),
  };
}
function post(url, body) {
  return fetch(url, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
}
async function raiseHalt(form) {
  const name = document.getElementById("employee").value;
  const reason = document.getElementById("reason").value;
  const c = await answer(await post("/console/api/halt/challenge", { employee: name, reason: reason }));
  const signed = await signWith(name, c.digest);
  const r = await answer(await post("/console/api/halt", { ...signed, reason: reason, at: c.at }));
  say("halt #" + r.halt_id + " raised: trading is halted", "ok");
}
async function liftHalt(form) {
  const name = form.querySelector(".employee").value;
  const id = form.dataset.halt;
  const c = await answer(await fetch("/console/api/halts/" + id + "/challenge"));
  const signed = await signWith(name, c.digest);
  const r = await answer(await post("/console/api/halts/" + id + "/lift", signed));
  form.closest("tr").querySelector(".lifters").textContent = r.signers.join(", ");
  say(r.lifted ? "halt #" + id + " lifted by " + r.signers.join(" and ") :
      "lift of halt #" + id + ": " + r.signers.length + " of " + r.needed + " employees", "ok");
}
async function requestWithdrawal(form) {
  const name = document.getElementById("employee").value;
  const fields = { employee: name };
  for (const id of ["account", "destination", "amount"]) fields[id] = document.getElementById(id).value;
  const c = await answer(await post("/console/api/requests/challenge", fields));
  const content = await signWith(name, c.digest);
  const w = await answer(await post("/console/api/requests", { ...fields, ...content, nonce: c.nonce, at: c.at }));
  say("withdrawal #" + w.id + " recorded: sign its exact transaction with your security key...", "waiting");
  const signed = await signWith(name, w.request_digest);
  const r = await answer(await post("/console/api/withdrawals/" + w.id + "/request", signed));
  say("withdrawal #" + r.id + " requested by " + r.requester + ": it awaits approvals", "ok");
}
async function cancelRequest(form) {
  const name = document.getElementById("employee").value;
  const reason = document.getElementById("cancel-reason").value;
  const url = "/console/api/withdrawals/" + form.dataset.withdrawal + "/cancel";
  const c = await answer(await post(url + "/challenge", { employee: name, reason: reason }));
  const signed = await signWith(name, c.digest);
  const r = await answer(await post(url, { ...signed, reason: reason }));
  say("withdrawal #" + r.id + " cancelled by " + name + ": the customer's balance is released", "ok");
}
for (const form of document.querySelectorAll("form.lift")) {
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    say("waiting for the security key...", "waiting");
    liftHalt(form).catch((err) => say("refused: " + err.message, "refused"));
  });
}
const forms = [
  ["approve", approve], ["register", register], ["raise", raiseHalt], ["request", requestWithdrawal],
  ["cancel", cancelRequest],
];
for (const [id, run] of forms) {
  const form = document.getElementById(id);
  if (!form) continue;
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    say("waiting for the security key...", "waiting");
    run(form).catch((err) => say("refused: " + err.message, "refused"));
  });
}
"""

STYLE = """
body { font: 15px/1.4 system-ui, sans-serif; margin: 0; color: #1b1f24; }
header { background: #1b1f24; padding: .6em 1.2em; }
header a { color: #fff; text-decoration: none; font-weight: 600; }
main { padding: 1em 1.2em; max-width: 72em; }
table { border-collapse: collapse; margin: .4em 0 1em; }
th, td { border: 1px solid #c9d1d9; padding: .25em .6em; text-align: left; font-variant-numeric: tabular-nums; }
td.num { text-align: right; }
code { font: 13px ui-monospace, monospace; word-break: break-all; background: #f3f4f6; padding: .1em .3em; }
.ok { color: #116329; } .refused, .violations, .unsigned { color: #a40e26; }
button { font: inherit; padding: .3em .9em; }
.operational { color: #116329; } .degraded, .halted { color: #a40e26; }
"""
