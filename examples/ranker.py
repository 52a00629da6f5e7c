"""Example ranker: re-rank candidate items for a user with their live profile.

A recommender's first stage returns candidates with a relevance score; this
second stage adjusts them with what the profile stream knows *now*:

* category affinity -- items whose category is among the user's
  ``top_categories`` get a boost that decays with the category's rank;
* buying intent -- the probability that the user's next action is ``cart``
  or ``purchase`` scales that boost, so a user about to buy sees their
  categories first, while a browsing user keeps more of the base order
  (exploration).

Unknown users keep the base order.  Profiles come from the workers' batch
lookup (one request for every user of a ranking round, the path a ranker
serving many users per request should take; ``age_ms`` says how old each
profile's newest event is), or without ``--workers`` from a profile-topic
subscriber.  Run against a deployment (env vars as for the worker; the token
from PROFILESTREAM_LOOKUP_TOKEN or PROFILESTREAM_LOOKUP_TOKEN_FILE)::

    python examples/ranker.py --workers http://127.0.0.1:6066 --user u42 --user u7 i1:c7:0.9 i2:c3:0.8 i3:c7:0.5
    python examples/ranker.py --user u42 i1:c7:0.9 i2:c3:0.8 i3:c7:0.5
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any, Sequence

from streams.clients.lookup import FOUND, NOT_FOUND, LookupClient
from streams.settings import Settings
from streams.clients.subscriber import ProfileSubscriber

#: Boost of an item in the user's top category at full buying intent.
CATEGORY_WEIGHT = 1.0
#: Share of the category boost that applies even with no buying intent.
BROWSING_FLOOR = 0.3


@dataclass(frozen=True)
class Candidate:
    item_id: str
    category_id: str
    score: float  # the first stage's relevance score


def rerank(candidates: Sequence[Candidate], profile: dict[str, Any] | None) -> list[tuple[Candidate, float]]:
    """Candidates with their adjusted scores, best first."""
    if profile is None:
        return sorted(((c, c.score) for c in candidates), key=lambda cs: -cs[1])
    rank = {category: i for i, category in enumerate(profile["top_categories"])}
    intent = profile["intent"]
    buying = intent["cart"] + intent["purchase"]
    weight = CATEGORY_WEIGHT * (BROWSING_FLOOR + (1 - BROWSING_FLOOR) * buying)
    scored = []
    for c in candidates:
        affinity = 1.0 / (1 + rank[c.category_id]) if c.category_id in rank else 0.0
        scored.append((c, c.score * (1 + weight * affinity)))
    return sorted(scored, key=lambda cs: -cs[1])


def parse_candidate(text: str) -> Candidate:
    item_id, category_id, score = text.split(":")
    return Candidate(item_id, category_id, float(score))


def fetch_profiles(users: Sequence[str], workers: Sequence[str], settings: Settings,
                   timeout: float) -> dict[str, dict[str, Any] | None]:
    """Every user's profile (None: unknown or not available now), in one batch lookup or from the topic."""
    if workers:
        results = LookupClient(workers, token=settings.lookup_token or None).get_many(users)
        for user, result in results.items():
            if result.status == FOUND:
                print(f"{user}: newest event in the profile {result.age_ms} ms ago")
            elif result.status != NOT_FOUND:
                print(f"{user}: lookup {result.status} ({result.reason})")
        return {user: r.profile if r.status == FOUND else None for user, r in results.items()}
    with ProfileSubscriber(settings) as profiles:
        if not profiles.wait_until_caught_up(timeout):
            raise SystemExit(f"profile topic not loaded within {timeout} s")
        return profiles.get_many(users)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--user", required=True, action="append", help="a user to rank for (repeatable)")
    parser.add_argument("--workers", nargs="+", default=[], metavar="URL",
                        help="workers' base URLs: batch lookup over HTTP (default: subscribe to the profile topic)")
    parser.add_argument("candidates", nargs="+", type=parse_candidate, help="item:category:score")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to load the profile topic")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    profiles = fetch_profiles(args.user, args.workers, Settings.from_env(), args.timeout)
    for user in args.user:
        profile = profiles.get(user)
        if profile is None:
            print(f"no profile for {user}; base order")
        else:
            print(f"{user}: intent {profile['intent']}, top categories {profile['top_categories'][:5]}")
        for candidate, score in rerank(args.candidates, profile):
            print(f"{score:8.3f}  {candidate.item_id}  ({candidate.category_id}, base {candidate.score})")


if __name__ == "__main__":
    main()
