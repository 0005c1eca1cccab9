from sftools.cli.main import main

main()
