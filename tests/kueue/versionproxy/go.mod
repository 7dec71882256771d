module rlhf-operator.io/tests/kueue/versionproxy

go 1.22
