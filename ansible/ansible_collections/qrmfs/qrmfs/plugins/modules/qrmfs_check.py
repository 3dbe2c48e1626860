#!/usr/bin/python
# -*- coding: utf-8 -*-
# GNU General Public License v2.0+ (see https://www.gnu.org/licenses/old-licenses/gpl-2.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r'''
---
module: qrmfs_check
short_description: The qrmfs preflight (qrmfs check)
description:
  - Runs C(qrmfs check --json) on the host the task runs on; it checks the config, the storage servers and
    sources named, and openQRM. Changes nothing.
  - Fails (with qrmfs's exit code 15) when a check failed; every check is returned either way.
version_added: "0.1.0"
author: qrmfs developers
options:
  targets:
    description: Storage servers or images to check, C(STORAGE) or C(STORAGE:/path/NAME).
    type: list
    elements: str
  locations:
    description: Sources to check, C(HOST:/rootfs) or a local directory.
    type: list
    elements: str
  openqrm_user:
    description: openQRM user; default from the qrmfs config.
    type: str
  openqrm_password:
    description: openQRM password, passed to qrmfs in its environment (never in argv).
    type: str
  openqrm_password_file:
    description: File whose first line is the openQRM password.
    type: path
  openqrm_url:
    description: openQRM base URL.
    type: str
  qrmfs_bin:
    description: The qrmfs executable.
    type: str
    default: qrmfs
  config:
    description: The qrmfs config file.
    type: path
notes:
  - Supports check mode (it changes nothing in either mode).
'''

EXAMPLES = r'''
- name: Preflight for this storage server and the golden host
  qrmfs.qrmfs.qrmfs_check:
    targets: ["{{ inventory_hostname }}"]
    locations: ["golden:/"]
  delegate_to: localhost
'''

RETURN = r'''
checks:
  description: Every check, each with name, status (ok, warn, fail), message and data.
  returned: always
  type: list
  elements: dict
failed_checks:
  description: The names of the checks that failed.
  returned: always
  type: list
  elements: str
warnings_count:
  description: How many checks warned.
  returned: always
  type: int
'''

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.qrmfs.qrmfs.plugins.module_utils import qrmfs as q


def argument_spec():
    spec = dict(targets=dict(type='list', elements='str'), locations=dict(type='list', elements='str'))
    spec.update(q.COMMON_ARGS)
    spec.update(q.OPENQRM_ARGS)
    return spec


def main():
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)
    try:
        res = q.run(module, q.check_argv(module.params))
    except q.QrmfsFailure as e:
        res = e.result or {}
        q.fail(module, e, **q.check_summary(res))
    module.exit_json(changed=False, **q.check_summary(res))


if __name__ == '__main__':
    main()
