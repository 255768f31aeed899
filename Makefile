# The two commands of the README, for those who prefer make.
.PHONY: demo test agent-clis
demo:
	pip install . && gigafactory demo
test: agent-clis
	pip install -e '.[test]' && python -m pytest
# Pinned agent CLIs into ~/.cache/gigafactory/agent-clis (GIGAFACTORY_AGENT_CLIS); idempotent.
agent-clis:
	scripts/install-agent-clis
