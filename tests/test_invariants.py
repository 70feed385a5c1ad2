"""The one-current-session invariant under a randomized mix of operations from two managers
(two replicas: one caching, one not) on one PostgreSQL table: Hypothesis stateful testing.

After every step, straight from the table: no user has two current sessions, the current
session is always an open one, and every call either succeeded or raised a typed error.
"""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule
from test_lifecycle import drop_postgres_tables

from bssagent import AgentSessionManager, BssAgentError

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(600)]
USERS = st.sampled_from(["u1", "u2", "u3"])
REPLICA = st.sampled_from([0, 1])


def machine(url: str) -> type[RuleBasedStateMachine]:
    class TwoReplicas(RuleBasedStateMachine):
        threads = Bundle("threads")

        def __init__(self) -> None:
            super().__init__()
            self.table = f"t_{uuid.uuid4().hex[:12]}"
            self.replicas = [
                AgentSessionManager(database_url=url, table_name=self.table),
                AgentSessionManager(database_url=url, table_name=self.table, cache_size=0),
            ]

        def call(self, replica: int, method: str, *args: Any) -> Any:
            try:
                return getattr(self.replicas[replica], method)(*args)
            except BssAgentError:
                return None  # typed: refused (no session, illegal transition, ...)

        @rule(target=threads, replica=REPLICA, user=USERS)
        def get_or_create(self, replica: int, user: str) -> Any:
            session = self.call(replica, "get_or_create_user_session", user)
            return (user, session.thread_id if session else str(uuid.uuid4()))

        @rule(target=threads, replica=REPLICA, user=USERS)
        def new_chat(self, replica: int, user: str) -> Any:
            session = self.call(replica, "create_user_session", user)
            return (user, session.thread_id if session else str(uuid.uuid4()))

        @rule(replica=REPLICA, thread=threads)
        def switch(self, replica: int, thread: tuple[str, str]) -> None:
            self.call(replica, "switch_session", *thread)

        @rule(replica=REPLICA, user=USERS, status=st.sampled_from(["completed", "failed"]))
        def end(self, replica: int, user: str, status: str) -> None:
            self.call(replica, "end_session", user, None, status)

        @rule(replica=REPLICA, user=USERS)
        def deactivate(self, replica: int, user: str) -> None:
            self.call(replica, "deactivate_session", user)

        @rule(replica=REPLICA, user=USERS)
        def pause_and_resume(self, replica: int, user: str) -> None:
            self.call(replica, "pause_session", user)
            self.call(1 - replica, "resume_session", user)

        @rule(replica=REPLICA, thread=threads)
        def delete(self, replica: int, thread: tuple[str, str]) -> None:
            self.call(replica, "delete_session", *thread)

        @invariant()
        def one_open_current_session_per_user(self) -> None:
            with psycopg.connect(url, autocommit=True) as conn:
                rows = conn.execute(
                    f'SELECT user_id, count(*), bool_and(status IN (\'active\', \'paused\'))'
                    f' FROM "{self.table}" WHERE is_active GROUP BY user_id'
                ).fetchall() if self._exists(conn) else []  # fmt: skip
            for user, current, all_open in rows:
                assert current == 1, f"{user} has {current} current sessions"
                assert all_open, f"{user}'s current session is not open"

        def _exists(self, conn: psycopg.Connection[Any]) -> bool:
            found = conn.execute("SELECT to_regclass(%s)", (f'"{self.table}"',)).fetchone()
            return found is not None and found[0] is not None

        def teardown(self) -> None:
            for replica in self.replicas:
                replica.close()
            drop_postgres_tables(url, self.table)

    return TwoReplicas


def test_two_replicas_never_give_a_user_two_current_sessions(pg_url: str) -> None:
    TwoReplicas = machine(pg_url)
    TwoReplicas.TestCase.settings = settings(
        max_examples=30,
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    TwoReplicas.TestCase().runTest()
