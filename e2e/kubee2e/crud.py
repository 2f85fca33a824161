"""One configmap through its whole life: create, get, update at the current and at a stale
resourceVersion (optimistic concurrency: 409), both kinds of patch, delete."""

from __future__ import annotations

from typing import Any

from .context import Context
from .outcome import CheckFailed
from .rest import brief, cm_body, cms


def run(ctx: Context) -> None:
    api = ctx.api
    ns = ctx.namespaces[0]
    state: dict[str, Any] = {}

    with ctx.check("crud-create-get"):
        created = api.expect(201, "POST", cms(ns), cm_body("crud", {"a": "1"}))
        got = api.expect(200, "GET", cms(ns, "crud"))
        if got["data"] != {"a": "1"} or got["metadata"]["uid"] != created["metadata"]["uid"]:
            raise CheckFailed(f"GET returned {brief(got)}")
        status, body = api.request("POST", cms(ns), cm_body("crud", {"a": "dup"}))
        if status != 409 or body.get("reason") != "AlreadyExists":
            raise CheckFailed(f"duplicate create: HTTP {status} {brief(body)} (want 409)")
        state["v1"] = got

    with ctx.check("crud-update-current-rv") as note:
        v1 = state["v1"]
        body = dict(v1, data={"a": "2"})
        v2 = api.expect(200, "PUT", cms(ns, "crud"), body)
        rv1 = int(v1["metadata"]["resourceVersion"])
        rv2 = int(v2["metadata"]["resourceVersion"])
        if rv2 <= rv1 or v2["data"] != {"a": "2"}:
            raise CheckFailed(f"update answered rv {rv2} (was {rv1}), data {v2['data']}")
        note.append(f"rv {rv1} -> {rv2}")
        state["v2"] = v2

    with ctx.check("crud-update-stale-rv-409") as note:
        stale = dict(state["v1"], data={"a": "stale"})
        status, body = api.request("PUT", cms(ns, "crud"), stale)
        if status != 409 or body.get("reason") != "Conflict":
            raise CheckFailed(f"HTTP {status} {brief(body)} (want 409 Conflict)")
        now = api.expect(200, "GET", cms(ns, "crud"))
        if now["data"] != {"a": "2"}:
            raise CheckFailed(f"the stale update changed the object: {now['data']}")
        note.append(body.get("message", "")[:90])

    with ctx.check("crud-merge-patch"):
        got = api.expect(
            200,
            "PATCH",
            cms(ns, "crud"),
            {"data": {"b": "3"}},
            content_type="application/merge-patch+json",
        )
        if got["data"] != {"a": "2", "b": "3"}:
            raise CheckFailed(f"data after patch: {got['data']}")

    with ctx.check("crud-strategic-merge-patch"):
        got = api.expect(
            200,
            "PATCH",
            cms(ns, "crud"),
            {"metadata": {"labels": {"patched": "yes"}}, "data": {"a": None}},
            content_type="application/strategic-merge-patch+json",
        )
        if got["data"] != {"b": "3"} or got["metadata"].get("labels") != {"patched": "yes"}:
            raise CheckFailed(
                f"after patch: data {got['data']}, labels {got['metadata'].get('labels')}"
            )

    with ctx.check("crud-delete"):
        api.expect(200, "DELETE", cms(ns, "crud"))
        status, body = api.request("GET", cms(ns, "crud"))
        if status != 404:
            raise CheckFailed(f"GET after delete: HTTP {status} {brief(body)}")
        status, body = api.request("DELETE", cms(ns, "crud"))
        if status != 404:
            raise CheckFailed(f"second delete: HTTP {status} {brief(body)}")
