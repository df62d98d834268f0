pytest_plugins = ["tests.fixtures.pg", "tests.fixtures.s3"]
