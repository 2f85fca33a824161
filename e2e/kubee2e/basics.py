"""The apiserver's everyday use of its store: an exact LIST at an early resourceVersion, the
namespaces its controllers create, events expiring through a lease, and bulk creates by many
threads at once."""

from __future__ import annotations

import concurrent.futures
import time

from .context import BULK_LABEL, EVENT_TTL_S, N_CONFIGMAPS, N_NAMESPACES, WORKERS, Context
from .outcome import CheckFailed, wait_until
from .rest import brief, cm_body, cms


def early_resource_version(ctx: Context) -> None:
    api = ctx.api
    with ctx.check("early-resource-version"):
        listing = api.expect(200, "GET", "/api/v1/namespaces")
        ctx.early_rv = int(listing["metadata"]["resourceVersion"])
        exact = api.expect(
            200,
            "GET",
            f"/api/v1/namespaces?resourceVersion={ctx.early_rv}&resourceVersionMatch=Exact",
        )
        if int(exact["metadata"]["resourceVersion"]) != ctx.early_rv:
            raise CheckFailed(
                f"Exact list at {ctx.early_rv} answered {exact['metadata']['resourceVersion']}"
            )
        ctx.early_exact_ok = f"LIST Exact at rv {ctx.early_rv} answered 200"


def default_namespaces(ctx: Context) -> None:
    api = ctx.api
    with ctx.check("default-namespaces") as note:
        # The apiserver creates them from its bootstrap controllers, after /readyz is fine.
        want = {"default", "kube-system", "kube-public"}
        names: set[str] = set()

        def present() -> bool:
            nonlocal names
            listing = api.expect(200, "GET", "/api/v1/namespaces")
            names = {i["metadata"]["name"] for i in listing["items"]}
            return want <= names

        try:
            wait_until("the default namespaces", present, 60)
        except CheckFailed as exc:
            raise CheckFailed(
                f"{exc}: missing {sorted(want - names)}, have {sorted(names)}"
            ) from None
        note.append(", ".join(sorted(names)))


def event_create(ctx: Context) -> None:
    api = ctx.api
    with ctx.check("event-create"):
        api.expect(201, "POST", "/api/v1/namespaces", {"metadata": {"name": "e2e-events"}})
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": "e2e-ttl"},
            "involvedObject": {
                "kind": "ConfigMap",
                "apiVersion": "v1",
                "namespace": "e2e-events",
                "name": "anything",
            },
            "reason": "E2E",
            "message": "expires through a kine-server lease",
            "type": "Normal",
            "firstTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        api.expect(201, "POST", "/api/v1/namespaces/e2e-events/events", event)
        ctx.event_created = time.monotonic()
        api.expect(200, "GET", "/api/v1/namespaces/e2e-events/events/e2e-ttl")


def create_namespaces(ctx: Context) -> None:
    api = ctx.api
    with ctx.check("create-namespaces") as note:
        ctx.namespaces = [f"e2e-{i:02d}" for i in range(N_NAMESPACES)]
        started = time.monotonic()

        def create(name: str) -> None:
            api.expect(201, "POST", "/api/v1/namespaces", {"metadata": {"name": name}})

        with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
            list(pool.map(create, ctx.namespaces))
        note.append(f"{N_NAMESPACES} in {time.monotonic() - started:.1f}s")


def create_configmaps(ctx: Context) -> None:
    api = ctx.api
    with ctx.check("create-configmaps") as note:
        started = time.monotonic()

        def create(i: int) -> tuple[str, str]:
            ns = ctx.namespaces[i % N_NAMESPACES]
            name = f"cm-{i:04d}"
            body = cm_body(name, {"i": str(i), "pad": "x" * 200}, {BULK_LABEL: "yes"})
            obj = api.expect(201, "POST", cms(ns), body)
            return f"{ns}/{name}", obj["metadata"]["uid"]

        with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
            ctx.bulk = dict(pool.map(create, range(N_CONFIGMAPS)))
        took = time.monotonic() - started
        note.append(
            f"{N_CONFIGMAPS} over {N_NAMESPACES} namespaces by {WORKERS} threads "
            f"in {took:.1f}s, {N_CONFIGMAPS / took:.0f}/s"
        )


def event_ttl(ctx: Context) -> None:
    api = ctx.api
    with ctx.check("event-ttl") as note:
        if not ctx.event_created:
            raise CheckFailed("no event was created")
        path = "/api/v1/namespaces/e2e-events/events/e2e-ttl"
        deadline = ctx.event_created + 60 + EVENT_TTL_S
        while True:
            status, body = api.request("GET", path)
            gone_after = time.monotonic() - ctx.event_created
            if status == 404:
                break
            if status != 200:
                raise CheckFailed(f"GET event: HTTP {status}: {brief(body)}")
            if time.monotonic() > deadline:
                raise CheckFailed(
                    f"event still there {gone_after:.0f}s after creation "
                    f"(--event-ttl={EVENT_TTL_S}s)"
                )
            time.sleep(0.5)
        if gone_after < EVENT_TTL_S - 1:
            raise CheckFailed(f"event gone after {gone_after:.1f}s, before its TTL")
        note.append(
            f"gone {gone_after:.1f}s after creation (TTL {EVENT_TTL_S}s, lease expiry in "
            "kine-server)"
        )
        # Only this event disappeared: the namespace and its other objects are intact.
        api.expect(200, "GET", "/api/v1/namespaces/e2e-events")
