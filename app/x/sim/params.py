"""Query-parameter validation as X does it: every problem becomes one item of a 400 invalid-request body."""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

SPACE_FIELDS = (
    "created_at,creator_id,ended_at,host_ids,id,invited_user_ids,is_ticketed,lang,participant_count,"
    "scheduled_start,speaker_ids,started_at,state,subscriber_count,title,topic_ids,updated_at"
).split(",")
SPACE_EXPANSIONS = ["creator_id", "host_ids", "invited_user_ids", "speaker_ids", "topic_ids"]
TOPIC_FIELDS = ["description", "id", "name"]
USER_FIELDS = (
    "affiliation,confirmed_email,connection_status,created_at,description,entities,id,is_identity_verified,"
    "location,most_recent_tweet_id,name,parody,pinned_tweet_id,profile_banner_url,profile_image_url,protected,"
    "public_metrics,receives_your_dm,subscription,subscription_type,url,username,verified,"
    "verified_followers_count,verified_type,withheld"
).split(",")
USER_EXPANSIONS = ["affiliation.user_id", "most_recent_tweet_id", "pinned_tweet_id"]
TWEET_FIELDS = (
    "article,attachments,author_id,card_uri,community_id,context_annotations,conversation_id,created_at,"
    "display_text_range,edit_controls,edit_history_tweet_ids,entities,geo,id,in_reply_to_user_id,lang,"
    "media_metadata,non_public_metrics,note_tweet,organic_metrics,possibly_sensitive,promoted_metrics,"
    "public_metrics,referenced_tweets,reply_settings,scopes,source,text,withheld"
).split(",")

SPACE_ID_PATTERN = "^[a-zA-Z0-9]{1,13}$"
USER_ID_PATTERN = "^[0-9]{1,19}$"
USERNAME_PATTERN = "^[A-Za-z0-9_]{1,15}$"

SPACE_PARAMS = ["expansions", "space.fields", "topic.fields", "user.fields"]
USER_PARAMS = ["expansions", "tweet.fields", "user.fields"]


class InvalidRequest(Exception):
    def __init__(self, problems: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(p["message"] for p in problems))
        self.problems = problems


class QueryParams:
    """Reads one request's query string; collects problems, and `done()` raises them all at once."""

    def __init__(self, items: list[tuple[str, str]], allowed: list[str]) -> None:
        self.problems: list[dict[str, Any]] = []
        self.values: dict[str, str] = {}
        for name, value in items:
            if name not in allowed:
                self._problem(name, value, f"The query parameter [{name}] is not one of [{','.join(allowed)}]")
            elif name in self.values:
                self._problem(name, value, f"Duplicate parameters are not allowed: the `{name}` query parameter")
            else:
                self.values[name] = value

    def _problem(self, name: str, value: str, message: str) -> None:
        self.problems.append({"parameters": {name: [value]}, "message": message})

    def required_list(self, name: str, pattern: str, *, max_items: int = 100) -> list[str]:
        value = self.values.get(name)
        if value is None or value == "":
            self._problem(name, value or "", f"The `{name}` query parameter can not be empty")
            return []
        items = value.split(",")
        if not 1 <= len(items) <= max_items:
            self._problem(
                name,
                value,
                f"The number of values in the `{name}` query parameter list [{len(items)}] "
                f"is not between 1 and {max_items}",
            )
            return []
        good = [item for item in items if self.matches(name, item, pattern)]
        return list(dict.fromkeys(good))

    def matches(self, name: str, value: str, pattern: str) -> bool:
        if re.fullmatch(pattern, value):
            return True
        self._problem(name, value, f"The `{name}` query parameter value [{value}] does not match {pattern}")
        return False

    def enum_list(self, name: str, allowed: Collection[str]) -> list[str]:
        value = self.values.get(name)
        if value is None:
            return []
        chosen = []
        for item in value.split(","):
            if item in allowed:
                chosen.append(item)
            else:
                self._problem(
                    name, item, f"The `{name}` query parameter value [{item}] is not one of [{','.join(allowed)}]"
                )
        return chosen

    def enum(self, name: str, allowed: Collection[str], default: str) -> str:
        value = self.values.get(name)
        if value is None:
            return default
        if value not in allowed:
            self._problem(
                name, value, f"The `{name}` query parameter value [{value}] is not one of [{','.join(allowed)}]"
            )
            return default
        return value

    def integer(self, name: str, low: int, high: int, default: int) -> int:
        value = self.values.get(name)
        if value is None:
            return default
        if not re.fullmatch(r"-?[0-9]+", value) or not low <= int(value) <= high:
            self._problem(name, value, f"The `{name}` query parameter value [{value}] is not between {low} and {high}")
            return default
        return int(value)

    def text(self, name: str, min_length: int, max_length: int) -> str:
        value = self.values.get(name)
        if value is None or value == "":
            self._problem(name, value or "", f"The `{name}` query parameter can not be empty")
            return ""
        if not min_length <= len(value) <= max_length:
            self._problem(
                name,
                value[:64],
                f"The `{name}` query parameter value is not between {min_length} and {max_length} characters",
            )
        return value

    def done(self) -> None:
        if self.problems:
            raise InvalidRequest(self.problems)
