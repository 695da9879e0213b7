"""The rating page: a FastAPI app, rendered on the server (Jinja2), over one rating set.

A rater signs in with a name (kept in a cookie), then sees one pair at a time: the shared history,
two unnamed answers, a choice (left / right / tie / both bad) and a 1-5 score per answer on each of
the four dimensions. Every form POSTs; the answer is a redirect (post/redirect/get) sent only after
the store has committed the rating, so a reload never resubmits and a restart loses nothing.
Skipped pairs come back once everything else is rated. The page reads `pairs.json` only; the key
stays on disk, unread. Keyboard shortcuts are a few lines of inline JS over the plain form.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from evalsuite.ab.blindset import RATINGS_FILE, BlindPair, load_pairs
from evalsuite.ab.dimensions import CHOICES, DIMENSIONS, SCORE_MAX, SCORE_MIN
from evalsuite.ab.store import SCORE_FIELDS, AlreadyRated, Rating, RatingStore, check_rater

COOKIE = "rater"
TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))


@dataclass(frozen=True)
class Progress:
    """Where one rater stands: the next pair (None when done) and the counts the page shows."""

    pair: BlindPair | None
    position: int
    total: int
    rated: int
    skipped: int
    revisiting: bool


def next_pair(pairs: list[BlindPair], rated: set[str], skipped: set[str]) -> Progress:
    """The first pair neither rated nor skipped; then the skipped ones again, in order."""
    todo = [i for i, p in enumerate(pairs) if p.id not in rated]
    fresh = [i for i in todo if pairs[i].id not in skipped]
    pick = (fresh or todo or [None])[0]
    return Progress(None if pick is None else pairs[pick], 0 if pick is None else pick + 1,
                    len(pairs), len(rated), len(skipped - rated), bool(todo) and not fresh)


def _rater(request: Request) -> str:
    """The signed-in rater's name ("" when none); the cookie holds it percent-encoded so any
    name (spaces, accents) survives the round trip."""
    return unquote(request.cookies.get(COOKIE, ""))


def _parse_rating(rater: str, form: Any, pair_ids: set[str]) -> Rating:
    """The posted form as a Rating; ValueError names the missing or bad field."""
    pair = str(form.get("pair", ""))
    if pair not in pair_ids:
        raise ValueError(f"pair {pair!r} is not in this rating set")
    if not form.get("choice"):
        raise ValueError(f"choose one of {', '.join(CHOICES)}")
    scores = {}
    for name in SCORE_FIELDS:
        raw = str(form.get(name, ""))
        if not raw.isdigit():
            got = raw or "nothing"
            raise ValueError(f"{name} needs a score {SCORE_MIN}-{SCORE_MAX}, got {got}")
        scores[name] = int(raw)
    return Rating(rater, pair, str(form["choice"]), scores)


def create_app(set_dir: Path) -> FastAPI:
    """The rating app for the set in `set_dir`; ratings go to `set_dir/ratings.sqlite`."""
    pairs = load_pairs(set_dir)
    pair_ids = {p.id for p in pairs}
    store = RatingStore(Path(set_dir) / RATINGS_FILE)
    app = FastAPI(title="Switchboard blind rating", docs_url=None, redoc_url=None,
                  openapi_url=None)

    def page(request: Request, name: str, status: int = 200, **context: Any) -> Response:
        return TEMPLATES.TemplateResponse(request, name, {"rater": _rater(request),
                                                          **context}, status_code=status)

    def message(request: Request, status: int, title: str, text: str) -> Response:
        return page(request, "message.html", status, title=title, text=text)

    def to(path: str) -> RedirectResponse:
        return RedirectResponse(path, status_code=303)

    @app.get("/", response_class=HTMLResponse)
    def home(request: Request) -> Response:
        if _rater(request):
            return to("/rate")
        return page(request, "signin.html", total=len(pairs))

    @app.post("/signin")
    async def signin(request: Request) -> Response:
        try:
            name = check_rater(str((await request.form()).get("name", "")))
        except ValueError as err:
            return page(request, "signin.html", 400, total=len(pairs), error=str(err))
        response = to("/rate")
        response.set_cookie(COOKIE, quote(name), httponly=True, samesite="strict")
        return response

    @app.post("/signout")
    def signout() -> Response:
        response = to("/")
        response.delete_cookie(COOKIE)
        return response

    @app.get("/rate", response_class=HTMLResponse)
    def rate_page(request: Request) -> Response:
        rater = _rater(request)
        if not rater:
            return to("/")
        progress = next_pair(pairs, store.rated(rater), store.skipped(rater))
        if progress.pair is None:
            return page(request, "done.html", progress=progress)
        return page(request, "rate.html", progress=progress, pair=progress.pair,
                    dimensions=DIMENSIONS, scores=range(SCORE_MIN, SCORE_MAX + 1))

    @app.post("/rate")
    async def rate(request: Request) -> Response:
        rater = _rater(request)
        if not rater:
            return message(request, 401, "Not signed in", "Sign in with your name first.")
        try:
            rating = _parse_rating(rater, await request.form(), pair_ids)
        except ValueError as err:
            return message(request, 400, "Rating not saved", str(err))
        try:
            store.add(rating)  # committed before the redirect: the page moves on only now
        except AlreadyRated as err:
            return message(request, 409, "Already rated", f"{err}; ratings are never changed.")
        return to("/rate")

    @app.post("/skip")
    async def skip(request: Request) -> Response:
        rater = _rater(request)
        if not rater:
            return to("/")
        pair = str((await request.form()).get("pair", ""))
        if pair not in pair_ids:
            return message(request, 400, "Not skipped", f"pair {pair!r} is not in this set")
        store.skip(rater, pair)
        return to("/rate")

    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free one), so the ready line can name the real port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def serve(set_dir: Path, host: str, port: int) -> None:
    """Serve the rating page until interrupted; prints one ready line with the address."""
    app = create_app(set_dir)
    sock = bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    print(f"rating page ready on http://{shown}:{sock.getsockname()[1]}/ "
          f"({len(load_pairs(set_dir))} pairs; ratings in {Path(set_dir) / RATINGS_FILE})",
          flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])
