"""The HTTP API of `moe-ext serve` (FastAPI, run by uvicorn).

  GET  /health                 status, versions, what is loaded (runtime, provider, groups,
                               steerable: whether /generate takes a mix, experts)
  POST /generate               {prompt, max_new_tokens, steer {group: bias} or mix
                               {group: weight} (a steerable adapter's preference mix),
                               do_sample, temperature, top_k, top_p, seed, chat_template, stream}
                               -> {text, new_tokens, runtime, provider}; with stream: true,
                               Server-Sent Events `data: {"text": piece}` then `data: [DONE]`
  POST /score                  {prompt, responses [..], user_id?} -> {rewards [..], personalized}
  POST /feedback               {user_id, prompt, chosen, rejected} -> the user's new profile
  GET  /users/{user_id}        the user's profile (404 when they sent no feedback)

Request bodies are validated (unknown fields, wrong types, non-finite numbers: 422 naming
the field); other bad requests (an unknown steering group, too many tokens, no model
loaded for the endpoint) get 400 or 404 with a message; so does a bad mix (a negative or
all-zero weight, an unknown group, a mix for a model that is not steerable or with a
steer). The blocking work runs in the server's thread pool, so requests proceed
concurrently."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..pmol.generate import GenerationOptions
from .profiles import StoreBusy


@dataclass
class ServeLimits:
    max_new_tokens: int = 512        # the most tokens one /generate may ask for
    max_responses: int = 64          # the most responses one /score may rank


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class GenerateRequest(_Body):
    prompt: str = Field(min_length=1)
    max_new_tokens: int = Field(64, ge=1)
    steer: dict[str, float] = Field(default_factory=dict)
    mix: Optional[dict[str, float]] = None
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_k: Optional[int] = Field(None, ge=1)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    seed: Optional[int] = Field(None, ge=0)
    chat_template: bool = True
    stream: bool = False


class ScoreRequest(_Body):
    prompt: str
    responses: list[str] = Field(min_length=1)
    user_id: Optional[str] = Field(None, min_length=1, max_length=256)


class FeedbackRequest(_Body):
    user_id: str = Field(min_length=1, max_length=256)
    prompt: str
    chosen: str
    rejected: str


def make_app(text=None, reward=None, store=None, update=None,
             limits: Optional[ServeLimits] = None) -> FastAPI:
    """The app over a TextEngine `text` (for /generate), a RewardEngine `reward` with a
    profile `store` and its feedback `update` (for /score, /feedback, /users); any may be
    None, and its endpoints then answer 404."""
    limits = limits or ServeLimits()
    app = FastAPI(title="moe-ext serve", version=__version__)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, err: RequestValidationError):
        # FastAPI's own 422 echoes each bad input back, which fails for NaN / Infinity
        # (not JSON): the location and the message say enough
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in err.errors()]
        return JSONResponse(status_code=422, content={"detail": errors})

    @app.exception_handler(StoreBusy)
    async def _busy(_request: Request, err: StoreBusy):
        return JSONResponse(status_code=503, content={"detail": str(err)},
                            headers={"Retry-After": "1"})

    @app.exception_handler(ValueError)
    async def _bad_value(_request: Request, err: ValueError):
        return JSONResponse(status_code=400, content={"detail": str(err)})

    def need(engine, option: str):
        if engine is None:
            raise HTTPException(404, f"this server has no model for this endpoint "
                                     f"(start it with {option})")
        return engine

    @app.get("/health")
    def health():
        out = {"status": "ok", "version": __version__, "generation": None, "reward": None}
        if text is not None:
            out["generation"] = {"runtime": text.runtime, "provider": text.provider,
                                 "groups": text.groups, "steerable": text.lm.steerable,
                                 "folder": text.folder}
        if reward is not None:
            out["reward"] = {"experts": reward.num_experts, "profiles": store.kind}
        return out

    @app.post("/generate")
    def generate(body: GenerateRequest):
        engine = need(text, "--model FOLDER")
        if body.max_new_tokens > limits.max_new_tokens:
            raise ValueError(f"max_new_tokens {body.max_new_tokens}: this server allows at "
                             f"most {limits.max_new_tokens}")
        options = GenerationOptions(max_new_tokens=body.max_new_tokens, do_sample=body.do_sample,
                                    temperature=body.temperature, top_k=body.top_k,
                                    top_p=body.top_p, seed=body.seed,
                                    chat_template=body.chat_template)
        engine.check_steer(body.steer, body.mix)
        if body.stream:
            def events():
                for piece in engine.stream(body.prompt, options, body.steer, body.mix):
                    yield f"data: {json.dumps({'text': piece})}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        out = engine.generate(body.prompt, options, body.steer, body.mix)
        return {**out, "runtime": engine.runtime, "provider": engine.provider}

    @app.post("/score")
    def score(body: ScoreRequest):
        engine = need(reward, "--reward-model DIR")
        if len(body.responses) > limits.max_responses:
            raise ValueError(f"responses: at most {limits.max_responses} per request, got "
                             f"{len(body.responses)}")
        profile = store.get(body.user_id) if body.user_id is not None else None
        rewards = engine.score(body.prompt, body.responses,
                               None if profile is None else profile.weights)
        return {"rewards": rewards, "user_id": body.user_id, "personalized": profile is not None}

    @app.post("/feedback")
    def feedback(body: FeedbackRequest):
        engine = need(reward, "--reward-model DIR")
        margins = engine.margins(body.prompt, body.chosen, body.rejected)  # outside the lock
        return store.add_feedback(body.user_id, margins, update).to_dict()

    @app.get("/users/{user_id}")
    def user(user_id: str):
        need(reward, "--reward-model DIR")
        profile = store.get(user_id)
        if profile is None:
            raise HTTPException(404, f"user {user_id!r} has sent no feedback")
        return profile.to_dict()

    return app
