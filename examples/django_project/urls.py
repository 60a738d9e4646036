"""The views of the example project: a JSON hello and a CSRF-protected login form."""

from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.template import engines
from django.urls import path, reverse

LOGIN_FORM = """<form method="post" action="{% url 'login' %}">{% csrf_token %}
<input name="user"><button>Log in</button></form>"""


def hello(request: HttpRequest) -> JsonResponse:
    return JsonResponse(
        {
            "hello": "from django",
            "path": request.path,
            "request_id": request.headers.get("X-Request-Id", ""),
        }
    )


def login(request: HttpRequest) -> HttpResponse:
    """GET: the form (and the csrftoken cookie); POST: log in and redirect."""
    if request.method == "POST":
        response = HttpResponseRedirect(request.build_absolute_uri(reverse("welcome")))
        response.set_signed_cookie("user", request.POST.get("user", ""), httponly=True)
        return response
    return HttpResponse(engines["django"].from_string(LOGIN_FORM).render({}, request))


def welcome(request: HttpRequest) -> JsonResponse:
    user = request.get_signed_cookie("user", default="")
    return JsonResponse({"welcome": user, "path": request.path, "home": reverse("hello")})


urlpatterns = [
    path("", hello),
    path("hello/", hello, name="hello"),
    path("login/", login, name="login"),
    path("welcome/", welcome, name="welcome"),
]
