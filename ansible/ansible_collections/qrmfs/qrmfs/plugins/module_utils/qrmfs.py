# -*- coding: utf-8 -*-
# GNU General Public License v2.0+ (see https://www.gnu.org/licenses/old-licenses/gpl-2.0.txt)
"""Shared by the qrmfs modules: argv lists for the `qrmfs` CLI (never a shell string), one runner that reads
qrmfs's JSON envelope, and the pure decisions (which command a state needs, whether it changed anything, the
diff). Everything but `run()` is free of Ansible, so it is unit-tested without a playbook.

The envelope (docs/json.md): {"schema": 1, "ok", "command", "result" | "error"}; a command that ran but
answers "no" (validate with problems, list with an unreachable server) carries both.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json

SCHEMA = 1

# The connection options every module takes (merged into each module's argument_spec).
COMMON_ARGS = dict(
    qrmfs_bin=dict(type='str', default='qrmfs'),
    config=dict(type='path'),
)
OPENQRM_ARGS = dict(
    openqrm_user=dict(type='str'),
    openqrm_password=dict(type='str', no_log=True),
    openqrm_password_file=dict(type='path', no_log=False),
    openqrm_url=dict(type='str'),
)

# create options: module parameter -> (flag, kind). kind: value (one flag + value), list (repeated flag),
# bool (flag when true), pair (--x when true, --no-x form given explicitly when false).
CREATE_OPTIONS = (
    ('excludes', '--exclude', 'list'),
    ('private_add', '--private-add', 'list'),
    ('private_exclude', '--private-exclude', 'list'),
    ('arch', '--arch', 'value'),
    ('operating_system', '--operating-system', 'value'),
    ('keep_services', ('--keep-services', '--remove-services'), 'pair'),
    ('keep_network', ('--keep-network', '--remove-network'), 'pair'),
    ('hostname', '--hostname', 'value'),
    ('route', '--route', 'value'),
)


class QrmfsFailure(Exception):
    """qrmfs exited non-zero (or printed no envelope): its exit code, error kind and message, and the result
    a "no" answer carries."""

    def __init__(self, rc, message, kind=None, detail=None, result=None, command=None):
        super(QrmfsFailure, self).__init__(message)
        self.rc = rc
        self.message = message
        self.kind = kind
        self.detail = detail
        self.result = result
        self.command = command

    def as_dict(self):
        return dict(rc=self.rc, msg=self.message, kind=self.kind, detail=self.detail, qrmfs_command=self.command,
                    qrmfs_result=self.result)


def base_argv(params, command, *args):
    argv = [params['qrmfs_bin'], command]
    argv.extend(args)
    argv.append('--json')
    if params.get('config'):
        argv.extend(['--config', params['config']])
    return argv


def _openqrm_args(params, register=True):
    """-o when the image is not (de)registered; otherwise the user, password file and URL given. The password
    itself never goes into argv: run() passes it as $QRMFS_PASSWORD."""
    if not register:
        return ['--only-physical']
    out = []
    if params.get('openqrm_user'):
        out.extend(['--username', params['openqrm_user']])
    if params.get('openqrm_password_file'):
        out.extend(['--password-file', params['openqrm_password_file']])
    if params.get('openqrm_url'):
        out.extend(['--openqrm-url', params['openqrm_url']])
    return out


def option_args(params):
    out = []
    for key, flag, kind in CREATE_OPTIONS:
        value = params.get(key)
        if value is None:
            continue
        if kind == 'list':
            for v in value:
                out.extend([flag, v])
        elif kind == 'pair':
            out.append(flag[0] if value else flag[1])
        else:
            out.extend([flag, str(value)])
    return out


def create_argv(params, check_mode):
    argv = base_argv(params, 'create', '-s', params['name'], '-t', params['target'], '-l', params['source'])
    argv.extend(option_args(params))
    if params.get('shared'):
        argv.append('--shared')
    if params.get('comment'):
        argv.extend(['--comment', params['comment']])
    argv.extend(_openqrm_args(params, params['register']))
    if check_mode:
        argv.append('--dry-run')
    return argv


def update_argv(params, check_mode):
    """update, with the source and options given (each overrides the one recorded in the image's manifest)."""
    argv = base_argv(params, 'update', '-t', params['target'])
    if params.get('source'):
        argv.extend(['-l', params['source']])
    argv.extend(option_args(params))
    if params.get('shared') is not None:
        argv.append('--shared' if params['shared'] else '--not-shared')
    if params.get('generations') is not None:
        argv.extend(['--keep-generations', str(params['generations'])])
    argv.extend(_openqrm_args(params, params['register']))
    if check_mode:
        argv.append('--dry-run')
    return argv


def remove_argv(params, check_mode):
    argv = base_argv(params, 'remove', '-t', params['target'], '--yes')
    argv.extend(_openqrm_args(params, params['register']))
    if check_mode:
        argv.append('--dry-run')
    return argv


def list_argv(params, storage=None, generations=False):
    argv = base_argv(params, 'list', *([storage] if storage else []))
    if generations:
        argv.append('--generations')
    return argv


def validate_argv(params, fix=False, check_mode=False):
    argv = base_argv(params, 'validate', '-t', params['target'])
    if fix:
        argv.append('--fix')
        if check_mode:
            argv.append('--dry-run')
    return argv


def check_argv(params):
    argv = base_argv(params, 'check')
    for t in params.get('targets') or []:
        argv.extend(['-t', t])
    for loc in params.get('locations') or []:
        argv.extend(['-l', loc])
    argv.extend(_openqrm_args(params, True))
    return argv


def parse_envelope(rc, stdout, stderr, argv):
    """The envelope's result for exit 0; QrmfsFailure otherwise (qrmfs's exit code, kind and message)."""
    command = list(argv)
    try:
        env = json.loads(stdout)
    except ValueError:
        env = None
    if not isinstance(env, dict) or env.get('schema') != SCHEMA:
        tail = (stderr or stdout or '').strip().splitlines()[-3:]
        raise QrmfsFailure(rc if rc else 1, 'qrmfs printed no JSON envelope (exit %s): %s' % (rc, ' | '.join(tail)),
                           command=command)
    if env.get('ok') and rc == 0:
        return env.get('result') or {}
    err = env.get('error') or {}
    raise QrmfsFailure(err.get('exit_code', rc) or rc, err.get('message') or 'qrmfs failed (exit %s)' % rc,
                       kind=err.get('kind'), detail=err.get('detail'), result=env.get('result'), command=command)


def split_target(target):
    """'nas1:/exports/web1' -> ('nas1', '/exports/web1'); the CLI checks the rest."""
    storage, sep, path = target.partition(':')
    if not sep or not storage or not path.startswith('/'):
        raise ValueError('target %r is not STORAGE:/path/NAME' % target)
    return storage, path


def find_image(listing, target):
    """The row of `list --json` for this target, or None."""
    storage, path = split_target(target)
    for row in listing.get('images') or []:
        if row.get('path') == path and (row.get('storage') == storage or row.get('target') == target):
            return row
    return None


def change_count(plan):
    """update --dry-run: how many paths the update would change."""
    return sum((plan.get('counts') or {}).values())


def update_diff(target, plan):
    lines = ['%s %s' % (c['change'], c['path']) for c in plan.get('changes') or []]
    if plan.get('truncated'):
        lines.append('... (%d more)' % (change_count(plan) - len(lines)))
    return dict(before_header=target, after_header=target + ' (new generation)',
                prepared='\n'.join(lines) + ('\n' if lines else ''))


def presence_diff(target, before, after):
    return dict(before_header=target, after_header=target, before='%s\n' % before, after='%s\n' % after)


def findings_diff(target, findings):
    lines = ['fix %s %s: %s' % (f['step'], f['path'], f['problem']) for f in findings]
    return dict(before_header=target, after_header=target + ' (validate --fix)', prepared='\n'.join(lines) + '\n')


def run(module, argv):
    """Run qrmfs with an argv list (no shell); the password, if any, goes through the environment."""
    env = {}
    if module.params.get('openqrm_password'):
        env['QRMFS_PASSWORD'] = module.params['openqrm_password']
    rc, out, err = module.run_command(argv, environ_update=env, check_rc=False)
    return parse_envelope(rc, out, err, argv)


def fail(module, failure, **extra):
    data = failure.as_dict()
    data.update(extra)
    module.fail_json(**data)


def check_summary(result):
    checks = result.get('checks') or []
    return dict(checks=checks, failed_checks=[c.get('name') for c in checks if c.get('status') == 'fail'],
                warnings_count=sum(1 for c in checks if c.get('status') == 'warn'))


def images_facts(listing, names=None):
    images = [row for row in listing.get('images') or [] if not names or row.get('name') in names]
    by_storage = {}
    for row in images:
        by_storage.setdefault(row.get('storage'), {})[row.get('name') or row.get('path')] = row
    return dict(images=images, by_storage=by_storage, errors=listing.get('errors') or [])
