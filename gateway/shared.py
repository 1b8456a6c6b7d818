"""A path that several dialects serve: the credential a request carries
picks the dialect (DIALECTS.md, mixpanel section: Mixpanel's SDKs use
Cohorly's paths, so a fleet can be moved by DNS alone).

Only the dialects whose endpoint on the path takes the request's method
are candidates; with one left, the request runs as on a path of its own.
Otherwise, in the order of the registry:
- before the body: the per-client-IP windows of every candidate are asked
  (nothing says yet whose request it is) and each candidate's `precheck`;
  the request is refused unread only when every candidate refuses it (the
  first one's refusal answers);
- the body is read and inflated within the largest candidate limit;
- each candidate says which credentials the request carries where it looks
  (`Dialect.carried`); the one whose lookups know one of them translates,
  under its own precheck and body limit. Known to two: invalid input,
  answered by the first candidate. Known to none (no credential, or only
  unknown ones): the first candidate answers, as on a path of its own.
Config load refuses a credential in the lists of two dialects that share
a path (`gateway.config`), so only a request mixing two credentials is
ambiguous. A path with one dialect never gets here: it costs nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import msgspec

from dialects.base import Endpoint, Failure, Incoming, Outcome
from gateway.http import BodyReader
from gateway.pipeline import PER_IP, TOO_LARGE, Ingest, Services, refusal_of


class Shared(Ingest):
    """The route of a path served by the `members`, in registry order."""

    def __init__(self, members: Sequence[Ingest], services: Services) -> None:
        first = members[0]
        endpoints = [m.endpoint for m in members]
        # What the request is read under before its dialect is known.
        endpoint = Endpoint(
            path=first.endpoint.path,
            name=first.endpoint.name,
            methods=tuple(sorted({method for e in endpoints for method in e.methods})),
            max_body=max(e.max_body for e in endpoints),
            ip_limited=any(e.ip_limited for e in endpoints),
            per_ip=any(e.per_ip for e in endpoints),
        )
        super().__init__(first.dialect, endpoint, services)
        self.members = tuple(members)

    async def _run(self, request: Incoming, reader: BodyReader) -> tuple[Outcome | Failure, Incoming, Ingest]:
        members = [m for m in self.members if request.method in m.endpoint.methods]
        first = members[0]
        if len(members) == 1:
            return await first._run(_named(request, first), reader)
        admissions = self._windows(request, members)
        refusals = [m.dialect.precheck(_named(request, m)) for m in members]
        if (refused := refusals[0]) is not None and all(r is not None for r in refusals):
            refused = await refusal_of(admissions) or refused
            await reader.refuse(request.headers)
            return refused, _named(request, first), first
        raw = await self._read(request, reader)
        if (limited := await refusal_of(admissions)) is not None:
            await reader.drain()
            return limited, _named(request, first), first
        if isinstance(raw, Failure):
            return raw, _named(request, first), first
        decoded = self._decode(request, raw)
        if isinstance(decoded, Failure):
            return decoded, _named(request, first), first
        picked = _pick(decoded, members)
        if isinstance(picked, Failure):
            return picked, _named(decoded, first), first
        member, mine = picked
        refused = refusals[members.index(member)]
        if refused is not None:
            return refused, mine, member
        if max(len(raw), len(mine.body)) > member.endpoint.max_body:
            return TOO_LARGE, mine, member
        return await member._process(mine), mine, member

    def _windows(self, request: Incoming, members: list[Ingest]) -> list[asyncio.Future[int]]:
        services = self.services
        asked = []
        if services.per_ip is not None and any(m.endpoint.per_ip for m in members):
            asked.append(services.limiter.sliding(PER_IP, request.client_ip, services.per_ip))
        for member in members:
            window = member.dialect.ip_limit() if member.endpoint.ip_limited else None
            if window is not None:
                asked.append(services.limiter.sliding(member.dialect.name, request.client_ip, window))
        return asked


def _pick(request: Incoming, members: list[Ingest]) -> tuple[Ingest, Incoming] | Failure:
    # The first member answers when no other claims the request, so it is
    # asked only when another does (to find a request of two dialects):
    # its own traffic pays for no second decoding of its body.
    claims: list[tuple[Ingest, Incoming]] = []
    for member in members[1:]:
        if (claim := _claim(request, member)) is not None:
            claims.append(claim)
    if not claims:
        return members[0], _named(request, members[0])
    if (first := _claim(request, members[0])) is not None:
        claims.insert(0, first)
    if len(claims) == 1:
        return claims[0]
    names = ", ".join(member.dialect.name for member, _ in claims)
    return Failure(
        kind="invalid",
        message=f"the request carries credentials of more than one dialect ({names})",
        details=(f"credentials: of more than one dialect ({names})",),
    )


def _claim(request: Incoming, member: Ingest) -> tuple[Ingest, Incoming] | None:
    """The member and the request as it sees it, when one of the
    credentials the request carries is in the member's lookups."""
    mine = _named(request, member)
    lookups = member.dialect.lookups.values()
    if any(_known(key, lookups) for key in member.dialect.carried(mine)):
        return member, mine
    return None


def _known(key: Hashable, lookups: Iterable[Mapping[Any, str]]) -> bool:
    try:
        return any(key in lookup for lookup in lookups)
    except TypeError:  # an unhashable key (a JSON list or object) names no project
        return False


def _named(request: Incoming, member: Ingest) -> Incoming:
    """The request as the member's endpoint sees it (its endpoint name)."""
    name = member.endpoint.name
    return request if request.endpoint == name else msgspec.structs.replace(request, endpoint=name)
