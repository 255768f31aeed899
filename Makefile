# The two commands of the README, for those who prefer make.
.PHONY: demo test
demo:
	pip install . && gigafactory demo
test:
	pip install -e '.[test]' && python -m pytest
