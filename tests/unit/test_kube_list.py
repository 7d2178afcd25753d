"""``Kube.list_all`` streams: each page is filed as it arrives (``keep``), never held whole, at
the page size asked; an expired continue token restarts the list without duplicates; ``lean``
keeps who wrote an object and when, not the field sets."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from core.kube import CONFIGMAP, Kube, lean


@dataclass
class Response:
    data: bytes


class PagedApi:
    """Answers LISTs of ConfigMaps from ``items``, ``limit`` at a time; ``expire`` makes the
    n-th continued page answer 410 once."""

    def __init__(self, items: list[dict[str, Any]], expire: int | None = None) -> None:
        self.items = items
        self.expire = expire
        self.limits: list[int] = []
        self.pages_sent = 0

    def call_api(
        self, path: str, method: str, query_params: list[tuple[str, str]], **_: Any
    ) -> Any:
        from kubernetes.client.exceptions import ApiException

        query = dict(query_params)
        limit = int(query["limit"])
        start = int(query.get("continue") or 0)
        if start and self.expire is not None and self.pages_sent == self.expire:
            self.expire = None
            raise ApiException(status=410, reason="Gone")
        self.limits.append(limit)
        self.pages_sent += 1
        page = self.items[start : start + limit]
        more = start + limit < len(self.items)
        body = {"metadata": {"continue": str(start + limit) if more else "",
                             "resourceVersion": "7"}, "items": page}  # fmt: skip
        return Response(json.dumps(body).encode())


def configmaps(n: int) -> list[dict[str, Any]]:
    return [
        {
            "metadata": {
                "name": f"cm{i}",
                "labels": {"keep": "yes" if i % 2 else "no"},
                "managedFields": [
                    {"manager": "m", "operation": "Apply", "time": "t", "fieldsV1": {"f:data": {}}}
                ],
            },
            "data": {"k": "v"},
        }
        for i in range(n)
    ]


def test_keep_files_each_item_and_drops_the_rest_at_the_page_size_asked() -> None:
    api = PagedApi(configmaps(25))
    kube = Kube(api, page_size=500)
    seen: list[str] = []

    def keep(item: dict[str, Any]) -> dict[str, Any] | None:
        seen.append(item["metadata"]["name"])
        assert item["kind"] == "ConfigMap" and item["apiVersion"] == "v1"
        return lean(item) if item["metadata"]["labels"]["keep"] == "yes" else None

    items, version = kube.list_all(CONFIGMAP, "ns", keep=keep, page_size=10)
    assert api.limits == [10, 10, 10]
    assert seen == [f"cm{i}" for i in range(25)]
    assert [i["metadata"]["name"] for i in items] == [f"cm{i}" for i in range(1, 25, 2)]
    assert version == "7"
    assert items[0]["metadata"]["managedFields"] == [{"manager": "m", "operation": "Apply",
                                                      "time": "t"}]  # fmt: skip
    assert kube.counters.by_verb["GET"] == 3


def test_an_expired_continue_token_restarts_the_list_without_duplicates() -> None:
    api = PagedApi(configmaps(25), expire=1)
    items, _ = Kube(api).list_all(CONFIGMAP, "ns", keep=lambda item: item, page_size=10)
    assert [i["metadata"]["name"] for i in items] == [f"cm{i}" for i in range(25)]


def test_the_client_page_size_is_the_default() -> None:
    api = PagedApi(configmaps(5))
    items, _ = Kube(api, page_size=2).list_all(CONFIGMAP, "ns")
    assert len(items) == 5 and api.limits == [2, 2, 2]
