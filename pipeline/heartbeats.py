"""Optuna's RDB storage with heartbeats that outlast a database restart."""

from __future__ import annotations

import optuna
import sqlalchemy.exc


class PatientHeartbeatStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage, except that a heartbeat the database cannot take (it is restarting) is
    skipped, not fatal. Optuna beats from a thread that ends at its first exception, and a trial
    whose beats stop is failed as stale by another worker while it still trains. The next beat
    retries, on a fresh session; pool_pre_ping (set by stores.open_storage) gives it a fresh connection."""

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError):
            self.scoped_session.remove()  # this thread's session may await a rollback: start the next beat afresh
