#!/usr/bin/python
# -*- coding: utf-8 -*-
# GNU General Public License v2.0+ (see https://www.gnu.org/licenses/old-licenses/gpl-2.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r'''
---
module: qrmfs_images
short_description: The images on qrmfs storage servers (qrmfs list)
description:
  - Runs C(qrmfs list --json) on the host the task runs on and returns the images, also keyed by storage
    server and name, so a play can loop over them or look one up. Changes nothing.
  - Fails (with qrmfs's exit code) when a storage server could not be reached; the images of the servers that
    answered are returned either way.
version_added: "0.1.0"
author: qrmfs developers
options:
  storage:
    description: Only this storage server (a name from the qrmfs config); default every one.
    type: str
  names:
    description: Only the images with these names.
    type: list
    elements: str
  generations:
    description: Also return each image's generations (C(qrmfs list --generations)).
    type: bool
    default: false
  validate:
    description:
      - Also run C(qrmfs validate) on every image listed (read-only) and add C(clean) and C(findings) to each.
      - The task then fails when an image has problems (qrmfs's exit code 12); every image is returned either way.
    type: bool
    default: false
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
- name: What each storage server holds
  qrmfs.qrmfs.qrmfs_images:
    storage: "{{ inventory_hostname }}"
  delegate_to: localhost
  register: held

- name: Every image that does not validate clean
  ansible.builtin.debug:
    msg: "{{ held.images | rejectattr('validation', 'equalto', 'clean') | map(attribute='target') | list }}"
'''

RETURN = r'''
images:
  description: One dict per image (storage, name, path, target, bytes, files, created, source, shared, arch, os,
    validation, registration, locked_by). I(registration.state) is C(sent) (openQRM ran new_image for an
    administrator; openQRM 5.3 shows no record, so the record itself is not verified, as I(registration.seen)
    says), C(pending), C(not_registered) or C(unknown); never C(registered) (see qrmfs's docs/openqrm.md).
  returned: always
  type: list
  elements: dict
by_storage:
  description: The images keyed by storage server, then by image name.
  returned: always
  type: dict
generations:
  description: Each image's generations (target and generations), with I(generations=true).
  returned: when generations is true
  type: list
  elements: dict
invalid:
  description: The targets of the images that did not validate clean, with I(validate=true).
  returned: when validate is true
  type: list
  elements: str
errors:
  description: The storage servers that could not be listed, with the error.
  returned: always
  type: list
  elements: dict
'''

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.qrmfs.qrmfs.plugins.module_utils import qrmfs as q


def argument_spec():
    spec = dict(storage=dict(type='str'), names=dict(type='list', elements='str'),
                generations=dict(type='bool', default=False), validate=dict(type='bool', default=False))
    spec.update(q.COMMON_ARGS)
    return spec


def main():
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)
    p = module.params
    try:
        out = q.images_facts(q.run(module, q.list_argv(p, p.get('storage'))), p.get('names'))
        if p['generations']:
            gens = q.run(module, q.list_argv(p, p.get('storage'), generations=True))
            out['generations'] = [g for g in gens.get('images') or []
                                  if not p.get('names') or g.get('target') in [i['target'] for i in out['images']]]
    except q.QrmfsFailure as e:
        q.fail(module, e, **q.images_facts(e.result or {}))
    if p['validate']:
        _validate(module, out)
    module.exit_json(changed=False, **out)


def _validate(module, out):
    """validate each image (read-only); fail with the first problem's exit code when any is not clean."""
    worst = None
    for row in out['images']:
        try:
            res = q.run(module, q.validate_argv(dict(module.params, target=row['target'])))
        except q.QrmfsFailure as e:
            if e.kind != 'invalid':
                q.fail(module, e, **out)
            res, worst = e.result or {}, worst or e
        row['clean'] = bool(res.get('clean'))
        row['findings'] = res.get('findings') or []
    out['invalid'] = [row['target'] for row in out['images'] if not row['clean']]
    if worst is not None:
        module.fail_json(msg='%d image(s) with problems: %s' % (len(out['invalid']), ', '.join(out['invalid'])),
                         rc=worst.rc, kind=worst.kind, **out)


if __name__ == '__main__':
    main()
