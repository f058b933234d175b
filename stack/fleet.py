"""A fleet (SPEC §9): any number of gateway Envoys sharing one Redis, one REST
front, one store and one Postgres, each with its own subscriber pointed at its
own control listener.

    with Fleet(tmp_dir, size=3) as fleet:
        fleet.set_directive(agent, "Be brief.")      # waits until every live subscriber settled it
        for envoy in fleet.envoys: ...               # fleet.envoys[0] is fleet.envoy
        fleet.part("envoy-2").kill()                 # one member down; the others go on

It is a `Stack` whose Envoy and subscriber are member 0; members 1..size-1 are the
same classes (`Envoy`, `Subscriber`) on ports of their own, parts `envoy-<i>` and
`subscriber-<i>`, started right after member 0's and stopped before them. The store
gets the fleet's Redis (`store_redis`), so that a cold fleet costs Postgres one query
per agent (companion/src/store/flight.rs).
"""

from stack.companion import Subscriber
from stack.ports import wait_until
from stack.stack import PORT_NAMES, Stack

MEMBER_PORTS = ("data", "control", "admin", "subscriber")
"""The ports each member of a fleet has of its own (`data-1`, `control-1`, ...)."""


class Fleet(Stack):
    """`size` Envoys, each with its subscriber, over one set of shared parts.

    Takes Stack's arguments (`store_redis` defaults to True here); `envoys` and
    `subscribers` list the members in order, member 0 being `envoy` and `subscriber`.
    """

    def __init__(self, directory, *, size=3, store_redis=True, **kwargs):
        if size < 1:
            raise ValueError("a fleet has at least one Envoy")
        self.size = size
        self.PORT_NAMES = PORT_NAMES + tuple(f"{name}-{i}" for i in range(1, size) for name in MEMBER_PORTS)
        super().__init__(directory, store_redis=store_redis, **kwargs)
        self.envoys = [self.envoy] + [self._make_envoy(**self.envoy_settings, member=i) for i in range(1, size)]
        self.subscribers = [self.subscriber] + [
            Subscriber(self.dir / f"subscriber-{i}", self.ports[f"subscriber-{i}"], self.redis.url,
                       [self.envoys[i].control_url], control_token=self.control_token, name=f"subscriber-{i}",
                       log_level=self.subscriber.extra_env.get("RUST_LOG", "info"), pid_dir=self.pid_dir,
                       log_dir=self.log_dir)
            for i in range(1, size)]
        parts = []
        for name in self.parts:
            parts.append(name)
            if name in ("envoy", "subscriber"):
                parts += [f"{name}-{i}" for i in range(1, size)]
        self.parts = parts

    # -- parts ------------------------------------------------------------------

    def members(self):
        """[(envoy, subscriber)] of every member, in order."""
        return list(zip(self.envoys, self.subscribers))

    def part(self, name):
        """A shared part by name (Stack's ORDER), or a member's `envoy-<i>` / `subscriber-<i>`."""
        kind, _, index = name.partition("-")
        if index and kind in ("envoy", "subscriber") and index.isdigit() and 0 < int(index) < self.size:
            return (self.envoys if kind == "envoy" else self.subscribers)[int(index)]
        return super().part(name)

    def start(self, name=None):
        """Start one part (a member's too) or, without a name, every part in order."""
        kind, _, index = (name or "").partition("-")
        if kind == "subscriber" and index:
            envoy, subscriber = self.members()[int(index)]
            subscriber.start()
            if envoy.running():
                # as Stack.start does for member 0: its first act is a flush; let it land
                wait_until(lambda: subscriber.settled_invalidations() >= 1,
                           what=f"{subscriber.name}'s initial flush to reach {envoy.name}")
            return self
        return super().start(name)

    def stop(self, name=None):
        """Stop one part, or every part: the members' (last first), then the shared ones."""
        if name is not None:
            return super().stop(name) if "-" not in name else self.part(name).stop()
        errors = []
        for envoy, subscriber in reversed(self.members()[1:]):
            for process in (subscriber, envoy):
                try:
                    process.stop()
                except Exception as exc:  # noqa: BLE001 - stop the others first
                    errors.append(f"{process.name}: {exc!r}")
        try:
            super().stop()
        except RuntimeError as exc:
            errors.append(str(exc))
        if errors:
            raise RuntimeError("stopping the fleet: " + "; ".join(errors))

    # -- conveniences ------------------------------------------------------------

    def _published(self, action, publish):
        """Run a companion command; when it publishes, wait until every subscriber whose
        Envoy runs settled it (one whose Envoy is down only logs its failed POSTs)."""
        live = [s for e, s in self.members() if s.running() and e.running()]
        if not (publish and live):
            return action()
        before = {s.name: s.settled_invalidations() for s in live}
        output = action()
        for subscriber in live:
            wait_until(lambda: subscriber.settled_invalidations() > before[subscriber.name],
                       what=f"{subscriber.name} to deliver the published update")
        return output

    def log_files(self):
        files = set(super().log_files())
        for envoy, subscriber in self.members():
            files.update(path for path in (*envoy.log_paths(), *subscriber.log_paths()) if path.exists())
        return sorted(files)
