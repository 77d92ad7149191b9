"""The platform's Airflow admin, kept equal to the deployment's secret.

Run by airflow-init after `airflow db migrate` (FAB's tables are migrated
with Airflow's): FAB's roles and permissions are synced, then the account
named by MLOPS_ADMIN_USER (default `admin`) exists, holds the Admin role
and has the password in AIRFLOW_ADMIN_PASSWORD (environment only, never a
command line). Other accounts (`mlopsctl users`) are left as they are.
A rotated AIRFLOW_ADMIN_PASSWORD recreates airflow-init, so this runs again.
"""

from __future__ import annotations

import os
import sys

from airflow.providers.fab.auth_manager.cli_commands.utils import get_application_builder


def main() -> int:
    name = os.environ.get("MLOPS_ADMIN_USER", "admin")
    password = os.environ.get("AIRFLOW_ADMIN_PASSWORD", "")
    if not password:
        print("AIRFLOW_ADMIN_PASSWORD is empty: mlopsctl generates it", file=sys.stderr)
        return 2
    with get_application_builder() as appbuilder:
        sm = appbuilder.sm
        # The default roles (Admin, Op, User, Viewer, Public) and their
        # permissions, as the API server would sync them at its start.
        sm.sync_roles()
        admin = sm.find_role("Admin")
        user = sm.find_user(username=name)
        if user is None:
            if not sm.add_user(name, "Platform", "Admin", f"{name}@localhost", admin, password):
                print(f"could not create the admin `{name}`", file=sys.stderr)
                return 1
            print(f"admin `{name}` created")
            return 0
        changed = False
        if admin not in user.roles:
            user.roles = [*user.roles, admin]
            changed = True
        if not user.active:
            user.active = True
            changed = True
        if changed and not sm.update_user(user):
            print(f"could not give `{name}` the Admin role", file=sys.stderr)
            return 1
        if not sm.reset_password(user.id, password):
            print(f"could not set the password of `{name}`", file=sys.stderr)
            return 1
        print(f"admin `{name}` kept: Admin role, the deployment's password")
    return 0


if __name__ == "__main__":
    sys.exit(main())
