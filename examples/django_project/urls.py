"""The single view of the example project."""

from django.http import HttpRequest, JsonResponse
from django.urls import path


def hello(request: HttpRequest) -> JsonResponse:
    return JsonResponse(
        {
            "hello": "from django",
            "path": request.path,
            "request_id": request.headers.get("X-Request-Id", ""),
        }
    )


urlpatterns = [path("", hello), path("hello/", hello)]
