"""Paginated LISTs as kubectl and controllers page: every configmap exactly once, all pages
at one resourceVersion, and a namespaced page with a label selector."""

from __future__ import annotations

import urllib.parse

from .context import BULK_LABEL, Context
from .outcome import CheckFailed
from .rest import cms


def paginate(ctx: Context) -> None:
    with ctx.check("list-pagination") as note:
        note.append(_paginate(ctx))


def _paginate(ctx: Context) -> str:
    api = ctx.api
    seen: dict[str, int] = {}
    bulk_seen: dict[str, str] = {}
    pages = 0
    rvs: set[str] = set()
    cont = ""
    while True:
        query = "limit=100" + (f"&continue={urllib.parse.quote(cont)}" if cont else "")
        page = api.expect(200, "GET", f"/api/v1/configmaps?{query}")
        pages += 1
        items = page["items"]
        cont = page["metadata"].get("continue", "")
        rvs.add(page["metadata"]["resourceVersion"])
        if len(items) > 100 or (cont and len(items) != 100):
            raise CheckFailed(
                f"page {pages} has {len(items)} items (limit 100), "
                f"continue={'yes' if cont else 'no'}"
            )
        for item in items:
            uid = item["metadata"]["uid"]
            seen[uid] = seen.get(uid, 0) + 1
            if (item["metadata"].get("labels") or {}).get(BULK_LABEL):
                key = f"{item['metadata']['namespace']}/{item['metadata']['name']}"
                bulk_seen[key] = uid
        if not cont:
            break
        if pages > 100:
            raise CheckFailed("more than 100 pages")
    dups = [u for u, n in seen.items() if n > 1]
    if dups:
        raise CheckFailed(f"{len(dups)} objects listed more than once")
    if bulk_seen != ctx.bulk:
        missing = set(ctx.bulk) - set(bulk_seen)
        extra = set(bulk_seen) - set(ctx.bulk)
        raise CheckFailed(
            f"{len(missing)} missing (e.g. {sorted(missing)[:3]}), {len(extra)} unexpected"
        )
    if len(rvs) != 1:
        raise CheckFailed(f"pages answered at different resourceVersions: {sorted(rvs)}")
    # One namespace through the same path, with a label selector.
    ns = ctx.namespaces[3]
    items = api.expect(200, "GET", f"{cms(ns)}?limit=7&labelSelector={BULK_LABEL}%3Dyes")
    want = sum(1 for k in ctx.bulk if k.startswith(f"{ns}/"))
    got_n = len(items["items"])
    if got_n != 7 or not items["metadata"].get("continue"):
        raise CheckFailed(f"namespaced page: {got_n} items (want 7 of {want}) ")
    return (
        f"{len(seen)} configmaps in {pages} pages of <=100 at rv {rvs.pop()}, each exactly "
        f"once, all {len(ctx.bulk)} bulk ones"
    )
