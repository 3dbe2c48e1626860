#!/usr/bin/python
# -*- coding: utf-8 -*-
# GNU General Public License v2.0+ (see https://www.gnu.org/licenses/old-licenses/gpl-2.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r'''
---
module: qrmfs_image
short_description: Create, update or remove a diskless NFS-root image with qrmfs
description:
  - Drives the C(qrmfs) CLI with C(--json) on the host the task runs on, where qrmfs and its config are; usually
    the controller (C(delegate_to=localhost), or a play with C(connection=local) whose inventory hosts name the
    storage servers).
  - C(present) creates the image when it does not exist; an existing image that validates clean is left alone
    (C(changed=false)); an existing image with problems is repaired with C(qrmfs validate --fix).
  - C(updated) runs C(qrmfs update) when C(qrmfs update --dry-run) reports changes, and reports C(changed) from
    those counts; an image that does not exist yet is created.
  - C(absent) runs C(qrmfs remove --yes), which also deregisters the image unless I(register=false).
  - Check mode runs the commands with C(--dry-run) (nothing is copied, written or registered); diff mode shows
    the itemized changes.
version_added: "0.1.0"
author: qrmfs developers
options:
  name:
    description: The image name (openQRM's limit, 1-50 letters, digits and C(_)); the last component of I(target).
    type: str
    required: true
  target:
    description: The storage server (a name from the qrmfs config) and the image path, C(STORAGE:/path/NAME).
    type: str
    required: true
  source:
    description:
      - The source root, C(HOST:/rootfs) (a host of the qrmfs config) or a local directory on the qrmfs host.
      - Required to create an image; for C(updated) it overrides the source recorded in the image.
    type: str
  state:
    description: What the image should be.
    type: str
    choices: [present, absent, updated]
    default: present
  excludes:
    description: Source directories not to copy (C(-e)).
    type: list
    elements: str
  private_add:
    description: Directories private to each node.
    type: list
    elements: str
  private_exclude:
    description: Directories inside a private one that stay common.
    type: list
    elements: str
  arch:
    description: Architecture tag sent to openQRM.
    type: str
  operating_system:
    description: Operating system tag sent to openQRM.
    type: str
  keep_services:
    description: Keep (true) or mask (false) services bound to the source's hardware; unset keeps qrmfs's default.
    type: bool
  keep_network:
    description: Keep the network configuration; unset keeps qrmfs's default (remove).
    type: bool
  hostname:
    description: Hostname of the image.
    type: str
  shared:
    description: Many nodes boot this image.
    type: bool
  route:
    description: How the copy runs.
    type: str
    choices: [ssh, nfs]
  comment:
    description: The openQRM image comment (create only).
    type: str
  generations:
    description: Earlier generations to keep after an update (C(qrmfs update --keep-generations)); unset keeps
      the config's C(keep_generations).
    type: int
  register:
    description: Register the image with openQRM (create) and deregister it (absent); false passes C(-o).
    type: bool
    default: true
  openqrm_user:
    description: openQRM user; default from the qrmfs config.
    type: str
  openqrm_password:
    description: openQRM password, passed to qrmfs in its environment (never in argv).
    type: str
  openqrm_password_file:
    description: File whose first line is the openQRM password (on the qrmfs host).
    type: path
  openqrm_url:
    description: openQRM base URL; default from the qrmfs config.
    type: str
  qrmfs_bin:
    description: The qrmfs executable.
    type: str
    default: qrmfs
  config:
    description: The qrmfs config file; default as qrmfs finds it (C($QRMFS_CONFIG), ~/.config/qrmfs, /etc/qrmfs).
    type: path
notes:
  - Failures carry qrmfs's exit code as I(rc) and its error kind as I(kind).
  - Supports check mode and diff mode.
'''

EXAMPLES = r'''
- name: One image per storage server, from the golden host
  qrmfs.qrmfs.qrmfs_image:
    name: "web_{{ inventory_hostname }}"
    target: "{{ inventory_hostname }}:/exports/web_{{ inventory_hostname }}"
    source: golden:/
    state: present
    config: /etc/qrmfs/config.toml
  delegate_to: localhost

- name: Re-pull it when the golden host changed, keep two generations
  qrmfs.qrmfs.qrmfs_image:
    name: web1
    target: nas1:/exports/web1
    state: updated
    generations: 2

- name: Remove it and deregister it from openQRM
  qrmfs.qrmfs.qrmfs_image:
    name: web1
    target: nas1:/exports/web1
    state: absent
'''

RETURN = r'''
operation:
  description: What the module did (or, in check mode, would do; on failure, what failed) - none, create, fix,
    update or remove.
  returned: always
  type: str
result:
  description: The C(result) of qrmfs's JSON envelope for the command that ran (see qrmfs's docs/json.md). Its
    I(registration.state) is C(sent) after a create (openQRM ran new_image for an administrator; the record itself
    is not verified, as I(registration.seen) says) and C(deregistration_sent) after a remove.
  returned: when a command changed or planned something
  type: dict
image:
  description: The image's row of C(qrmfs list --json) before the task, or null when it did not exist.
  returned: always
  type: dict
changes:
  description: For C(updated), the counts by kind (new, changed, metadata, deleted) of C(update --dry-run).
  returned: when state is updated and the image existed
  type: dict
rc:
  description: qrmfs's exit code (on failure).
  returned: failed
  type: int
kind:
  description: qrmfs's error kind (usage, exists, locked, connect, transfer, ...).
  returned: failed
  type: str
'''

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.qrmfs.qrmfs.plugins.module_utils import qrmfs as q


def argument_spec():
    spec = dict(
        name=dict(type='str', required=True),
        target=dict(type='str', required=True),
        source=dict(type='str'),
        state=dict(type='str', default='present', choices=['present', 'absent', 'updated']),
        excludes=dict(type='list', elements='str'),
        private_add=dict(type='list', elements='str'),
        private_exclude=dict(type='list', elements='str'),
        arch=dict(type='str'),
        operating_system=dict(type='str'),
        keep_services=dict(type='bool'),
        keep_network=dict(type='bool'),
        hostname=dict(type='str'),
        shared=dict(type='bool'),
        route=dict(type='str', choices=['ssh', 'nfs']),
        comment=dict(type='str'),
        generations=dict(type='int'),
        register=dict(type='bool', default=True),
    )
    spec.update(q.COMMON_ARGS)
    spec.update(q.OPENQRM_ARGS)
    return spec


def _create(module, out):
    p = module.params
    if not p.get('source'):
        module.fail_json(msg='%s does not exist: source is required to create it' % p['target'], rc=2, kind='usage')
    out['operation'] = 'create'
    out['result'] = q.run(module, q.create_argv(p, module.check_mode))
    out.update(changed=True, diff=q.presence_diff(p['target'], 'absent', 'present'))


def _present(module, out):
    p = module.params
    if out['image'] is None:
        return _create(module, out)
    try:
        q.run(module, q.validate_argv(p))
        return None  # exists and validates clean
    except q.QrmfsFailure as e:
        if e.kind != 'invalid':
            raise
    out['operation'] = 'fix'
    try:
        res = q.run(module, q.validate_argv(p, fix=True, check_mode=module.check_mode))
    except q.QrmfsFailure as e:
        # --fix --dry-run answers "no" (the findings are still there) with what it would fix; a real --fix that
        # leaves problems fails the task
        if not (module.check_mode and e.kind == 'invalid' and e.result):
            raise
        res = e.result
    fixed = res.get('would_fix') if module.check_mode else res.get('fixed')
    out.update(changed=bool(fixed), result=res, diff=q.findings_diff(p['target'], fixed or []))
    return None


def _updated(module, out):
    p = module.params
    if out['image'] is None:
        return _create(module, out)
    plan = q.run(module, q.update_argv(p, check_mode=True))
    out['changes'] = plan.get('counts') or {}
    if q.change_count(plan) == 0:
        return None
    out.update(changed=True, operation='update', diff=q.update_diff(p['target'], plan), result=plan)
    if not module.check_mode:
        out['result'] = q.run(module, q.update_argv(p, check_mode=False))
    return None


def _absent(module, out):
    p = module.params
    if out['image'] is None:
        return
    out['operation'] = 'remove'
    out['result'] = q.run(module, q.remove_argv(p, module.check_mode))
    out.update(changed=True, diff=q.presence_diff(p['target'], 'present', 'absent'))


def main():
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)
    p = module.params
    try:
        storage, _path = q.split_target(p['target'])
    except ValueError as e:
        module.fail_json(msg=str(e), rc=2, kind='usage')
    out = dict(changed=False, operation='none', image=None)
    try:
        # the one storage server only: a host of the fleet never waits for another's server
        out['image'] = q.find_image(q.run(module, q.list_argv(p, storage)), p['target'])
        {'present': _present, 'updated': _updated, 'absent': _absent}[p['state']](module, out)
    except q.QrmfsFailure as e:
        q.fail(module, e, operation=out['operation'], image=out['image'])
    if not module._diff:
        out.pop('diff', None)
    module.exit_json(**out)


if __name__ == '__main__':
    main()
